localrules:
    report,


rule report:
    """Paper-shaped tables (CSV + Markdown), figures and QuPath GeoJSON of the classified test cells."""
    input:
        unpack(report_inputs),
    output:
        csv=report("results/report/cv_results.csv", caption="../report/cv_results.rst", category="Results"),
        md="results/report/cv_results.md",
        folds="results/report/cv_folds.csv",
        summary="results/report/summary.json",
        boxplot=report("results/report/cv_boxplot.png", caption="../report/cv_boxplot.rst", category="Results"),
        confusion=report("results/report/confusion_best.png", caption="../report/confusion.rst", category="Results"),
        stages=report("results/report/stages.csv", caption="../report/stages.rst", category="Pipeline"),
        geojson=directory("results/report/qupath"),
    log:
        "results/logs/report.log",
    conda:
        "../envs/report.yaml"
    params:
        experiments=report_experiments(),
        classes=config["classes"],
        metric=config["report"]["metric"],
        min_points_on_nuclei=config["segmentation"]["min_points_on_nuclei"],
        # provenance only (recorded in summary.json): report is a cheap local rule, so it reruns on
        # any config edit to keep the recorded config true; no other rule takes the whole config
        config=config,
    script:
        "../scripts/report.py"
