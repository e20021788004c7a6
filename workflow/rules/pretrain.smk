rule pretrain:
    """Self-supervised pretraining ({method}-{backbone}-{scan}) on unlabelled crops kept by the grader."""
    input:
        unpack(pretrain_inputs),
    output:
        weights="results/pretrain/{run}/backbone.safetensors",
        history="results/pretrain/{run}/history.csv",
        curve=report(
            "results/pretrain/{run}/loss.png", caption="../report/pretrain.rst", category="Pretraining"
        ),
    params:
        pretrain=config["pretrain"],
        scans=config["scans"],
        seed=config["seed"],
    log:
        "results/logs/pretrain/{run}.log",
    benchmark:
        "results/benchmarks/pretrain/{run}.tsv"
    threads: 2
    # the fine-tuning folds of every pretrained configuration wait for it: start it first
    priority: 10
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=GPU * int(config.get("devices_per_job", 1)),  # data-parallel training: docs/hpc.md
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    conda:
        "../envs/ml.yaml"
    script:
        "../scripts/pretrain.py"
