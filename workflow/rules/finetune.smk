rule finetune:
    """One cross-validation fold of one configuration; evaluated on its val fold and the test slides."""
    input:
        unpack(finetune_inputs),
    output:
        metrics="results/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}/metrics.json",
        predictions="results/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}/predictions.parquet",
        history="results/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}/history.csv",
        embeddings="results/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}/embeddings.parquet",
    log:
        "results/logs/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}.log",
    benchmark:
        "results/benchmarks/finetune/{scan}/{background}/{backbone}/{init}/{distance}/{loss}/fold{fold}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 1
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=GPU * TRAIN_DEVICES,  # data-parallel training: docs/hpc.md
        cpus_per_gpu=1,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        img_size=crop_size_of_scan,
        background=with_background,
        distance=with_distance,
        n_folds=config["finetune"]["n_folds"],
        recipe=recipe_name,
        recipe_settings=recipe_settings,
        loss_settings=loss_settings,
        batch_size=config["finetune"]["batch_size"],
        group_by=config["finetune"]["group_by"],
        augment=config["finetune"]["augment"],
        classes=config["classes"],
        static_classes=config["static_classes"],
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/finetune.py"
