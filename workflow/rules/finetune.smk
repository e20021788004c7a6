rule finetune:
    """One cross-validation fold of one configuration; evaluated on its val fold and the test slides."""
    input:
        unpack(finetune_inputs),
    output:
        metrics="results/finetune/{experiment}/fold{fold}/metrics.json",
        predictions="results/finetune/{experiment}/fold{fold}/predictions.parquet",
    params:
        experiment=experiment_params,
        finetune=config["finetune"],
        scans=config["scans"],
        classes=config["classes"],
        static_classes=config["static_classes"],
        seed=config["seed"],
    log:
        "results/logs/finetune/{experiment}/fold{fold}.log",
    benchmark:
        "results/benchmarks/finetune/{experiment}/fold{fold}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=GPU * int(config.get("devices_per_job", 1)),  # data-parallel training: docs/hpc.md
        cpus_per_gpu=1,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    conda:
        "../envs/ml.yaml"
    script:
        "../scripts/finetune.py"
