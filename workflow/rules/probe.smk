# Frozen-backbone probes of every pretraining run (issue 12 item 7; cellstage.ssl.probe;
# input functions in common.smk).


rule probe:
    """kNN and linear-probe Top-1 / Adjacent-1 of the frozen pretrained backbone and of a random-init
    one (same architecture and seed) on the labelled train cells of the scan, over grouped folds."""
    input:
        unpack(probe_inputs),
    output:
        "results/pretrain/{method}/{backbone}/{scan}/probe.json",
    log:
        "results/logs/probe/{method}/{backbone}/{scan}.log",
    benchmark:
        "results/benchmarks/probe/{method}/{backbone}/{scan}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
    params:
        classes=config["classes"],
        static_classes=config["static_classes"],
        n_folds=config["finetune"]["n_folds"],
        # grouped folds (no section on both sides); finetune.group_by when set (patient/section/slide)
        group_by=config["finetune"]["group_by"] or "section",
        k=config["pretrain"]["probe"]["k"],  # kNN neighbours (fewer when a training fold is smaller)
        C=config["pretrain"]["probe"]["C"],  # inverse L2 strength of the linear probe
        seed=config["seed"],
    script:
        "../scripts/probe.py"
