rule train_grader:
    """ResNet18 grading network on expert quality grades 1-4 (useful) vs 5-6 (unsuitable), seed 003."""
    input:
        unpack(grader_inputs),
    output:
        model=directory("results/grader"),
    log:
        "results/logs/train_grader.log",
    benchmark:
        "results/benchmarks/train_grader.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(6000),
        runtime=scaled(120),
        gpu=GPU * TRAIN_DEVICES,  # data-parallel training: docs/hpc.md
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        backbone=config["grading"]["backbone"],
        epochs=config["grading"]["epochs"],
        batch_size=config["grading"]["batch_size"],
        loss_weights=config["grading"]["loss_weights"],
        size=config["scans"][REF_SCAN]["crop_size"],
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/train_grader.py"


rule grade:
    """Grading network applied to every crop of a reference slide: P(unsuitable) and a keep flag."""
    input:
        model="results/grader",
        zarr="results/crops/{ref_slide}.zarr",
        index="results/crops/{ref_slide}.parquet",
    output:
        grading="results/grading/{ref_slide}.parquet",
    log:
        "results/logs/grade/{ref_slide}.log",
    benchmark:
        "results/benchmarks/grade/{ref_slide}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
        gpu=GPU,
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        threshold=config["grading"]["threshold"],
    script:
        "../scripts/grade.py"
