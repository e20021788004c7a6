rule pretrain:
    """Self-supervised pretraining ({method}, {backbone}, {scan}) on unlabelled crops kept by the grader."""
    input:
        unpack(pretrain_inputs),
    output:
        weights="results/pretrain/{method}/{backbone}/{scan}/backbone.safetensors",
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
        epochs=config["pretrain"]["epochs"],
        batch_size=config["pretrain"]["batch_size"],
        max_crops=config["pretrain"]["max_crops"],
        method_settings=pretrain_method_settings,
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/pretrain.py"
