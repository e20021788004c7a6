rule pretrain:
    """Self-supervised pretraining ({method}, {backbone}, {scan}) on the pool (config pretrain.pool) kept by
    the grader, validated on the labelled train crops; the best-validation-loss epoch is exported."""
    input:
        unpack(pretrain_inputs),
    output:
        weights="results/pretrain/{method}/{backbone}/{scan}/backbone.safetensors",
        heads="results/pretrain/{method}/{backbone}/{scan}/heads.safetensors",
        history="results/pretrain/{method}/{backbone}/{scan}/history.csv",
        curve=report(
            "results/pretrain/{method}/{backbone}/{scan}/loss.png",
            caption="../report/pretrain.rst",
            category="Pretraining",
        ),
        summary="results/pretrain/{method}/{backbone}/{scan}/pretrain.json",
    log:
        "results/logs/pretrain/{method}/{backbone}/{scan}.log",
    benchmark:
        "results/benchmarks/pretrain/{method}/{backbone}/{scan}.tsv"
    # the fine-tuning folds of every pretrained configuration wait for it: start it first
    priority: 10
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=GPU * TRAIN_DEVICES,  # data-parallel training: docs/hpc.md
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        img_size=crop_size_of_scan,
        variant=config["pretrain"]["variant"],
        pool=config["pretrain"]["pool"],
        augment=config["pretrain"]["augment"],
        num_workers=config["pretrain"]["num_workers"],
        epochs=config["pretrain"]["epochs"],
        batch_size=config["pretrain"]["batch_size"],
        max_crops=config["pretrain"]["max_crops"],
        method_settings=pretrain_method_settings,
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/pretrain.py"


rule mae_reconstructions:
    """Seed 000 Fig. A.2: input, masked input and reconstruction of validation crops by an MAE run
    (its exported best-epoch backbone and decoder)."""
    input:
        unpack(mae_reconstruction_inputs),
    output:
        report(
            "results/pretrain/mae/{backbone}/{scan}/reconstructions.png",
            caption="../report/mae_reconstructions.rst",
            category="Pretraining",
        ),
    log:
        "results/logs/mae_reconstructions/{backbone}/{scan}.log",
    benchmark:
        "results/benchmarks/mae_reconstructions/{backbone}/{scan}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 1
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(20),
    params:
        seed=config["seed"],
    script:
        "../scripts/mae_reconstructions.py"
