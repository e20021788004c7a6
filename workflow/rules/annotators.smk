# Annotator study of seed 000 §4.1 (Tables 2-3): runs when config annotators.sheet is set
# (input functions in common.smk).
localrules:
    annotator_study,


rule annotator_study:
    """Inter-/intra-observer agreement (Top-1, Adj-1 Dyn, Adj-2 Dyn) on the 11-label scale, per scan."""
    input:
        unpack(annotator_study_inputs),
    output:
        table2_csv=report("results/report/annotators/table2_variability.csv", category="Annotator study"),
        table2_md="results/report/annotators/table2_variability.md",
        table3_csv=report("results/report/annotators/table3_scan_quality.csv", category="Annotator study"),
        table3_md="results/report/annotators/table3_scan_quality.md",
        provenance="results/report/annotators/provenance.json",
    log:
        "results/logs/annotator_study.log",
    benchmark:
        "results/benchmarks/annotator_study.tsv"
    conda:
        "../envs/report.yaml"
    params:
        classes=config["classes"],
        static_classes=config["static_classes"],
        scans=list(config["scans"]),
        reference_scan=config["reference_scan"],
        separator=config["annotators"]["intermediate_separator"],
    script:
        "../scripts/annotator_study.py"
