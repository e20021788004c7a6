localrules:
    report,


rule report:
    """Paper-shaped tables (CSV + Markdown: Table 1, A.5-A.7), figures (Figs 4-7, confusion matrices)
    and QuPath GeoJSON of the classified test cells, from stored outputs only (`make tables`)."""
    input:
        unpack(report_inputs),
        probes=probe_files(),  # frozen-backbone probes of every pretraining run (rule probe)
    output:
        csv=report("results/report/cv_results.csv", caption="../report/cv_results.rst", category="Tables"),
        md="results/report/cv_results.md",
        folds="results/report/cv_folds.csv",
        summary="results/report/summary.json",
        table1_csv=report("results/report/table1_datasets.csv", caption="../report/table1.rst", category="Tables"),
        table1_md="results/report/table1_datasets.md",
        a5_csv=report("results/report/tableA5_scratch.csv", caption="../report/tableA5.rst", category="Tables"),
        a5_md="results/report/tableA5_scratch.md",
        a6_csv=report("results/report/tableA6_imagenet.csv", caption="../report/tableA6.rst", category="Tables"),
        a6_md="results/report/tableA6_imagenet.md",
        a7_csv=report("results/report/tableA7_finetune.csv", caption="../report/tableA7.rst", category="Tables"),
        a7_md="results/report/tableA7_finetune.md",
        losses_csv=report("results/report/table_losses.csv", caption="../report/losses.rst", category="Tables"),
        losses_md="results/report/table_losses.md",
        probes_csv=report("results/report/ssl_probes.csv", caption="../report/ssl_probes.rst", category="Tables"),
        probes_md="results/report/ssl_probes.md",
        fig4=report("results/report/fig4_baseline.png", caption="../report/fig4.rst", category="Figures"),
        umap=report("results/report/fig5_umap.png", caption="../report/fig5.rst", category="Figures"),
        fig6=report("results/report/fig6_distance.png", caption="../report/fig6.rst", category="Figures"),
        boxplot=report("results/report/cv_boxplot.png", caption="../report/cv_boxplot.rst", category="Figures"),
        confusion=report("results/report/confusion_best.png", caption="../report/confusion.rst", category="Figures"),
        confusion_scans=report(
            "results/report/confusion_per_scan.png", caption="../report/confusion_scans.rst", category="Figures"
        ),
        confusion_csv="results/report/confusion_per_scan.csv",
        stages=report("results/report/stages.csv", caption="../report/stages.rst", category="Pipeline"),
        excluded="results/report/excluded.csv",  # slides that failed (require_all_slides: false)
        geojson=directory("results/report/qupath"),
        provenance="results/report/provenance.json",
    log:
        "results/logs/report.log",
    conda:
        "../envs/report.yaml"
    params:
        experiments=report_experiments(),
        classes=config["classes"],
        metric=config["report"]["metric"],
        seed=config["seed"],
        min_points_on_nuclei=config["segmentation"]["min_points_on_nuclei"],
        # provenance: the config's hash, not the config (every table records it; the report reruns on a change)
        config_hash=report_config_hash(),
    script:
        "../scripts/report.py"
