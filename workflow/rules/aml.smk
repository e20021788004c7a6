# The AML pipeline of seed 003 (docs/aml.md): three-level data reduction of blood-smear slides and
# slide-level multi-instance learning with patient-wise cross-validation. Slides: the sheet's rows
# with `labels` (AML_SLIDES); runs when config `pipelines` holds `aml`.


rule aml_level_one:
    """Level One (seed 003 §2.1.1): inner tiles -> patches, Laplace blur filter, CIELab a/b K-means,
    contour count and area filter. Every examined patch is listed with the reason it was dropped."""
    input:
        slide="results/slides/{aml_slide}.ome.zarr",
    output:
        zarr=directory("results/aml/level1/{aml_slide}.zarr"),
        index="results/aml/level1/{aml_slide}.parquet",
    log:
        "results/logs/aml/level1/{aml_slide}.log",
    benchmark:
        "results/benchmarks/aml/level1/{aml_slide}.tsv"
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(60),
    params:
        settings=config["aml"]["level_one"],
        seed=config["seed"],
    script:
        "../scripts/aml_level_one.py"


rule aml_level_two:
    """Level Two (seed 003 §2.1.2): a crop around every cell of the kept patches, with and without
    background, filtered by compactness K-means (k = 2)."""
    input:
        zarr="results/aml/level1/{aml_slide}.zarr",
        index="results/aml/level1/{aml_slide}.parquet",
    output:
        zarr=directory("results/aml/level2/{aml_slide}.zarr"),
        index="results/aml/level2/{aml_slide}.parquet",
    log:
        "results/logs/aml/level2/{aml_slide}.log",
    benchmark:
        "results/benchmarks/aml/level2/{aml_slide}.tsv"
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(60),
    params:
        settings=config["aml"]["level_two"],
        seed=config["seed"],
    script:
        "../scripts/aml_level_two.py"


rule aml_train_grader:
    """The grading network (seed 003 §2.1.3, Table 1) trained on the AML slides' expert grades."""
    input:
        unpack(aml_grader_inputs),
    output:
        model=directory("results/aml/grader"),
    log:
        "results/logs/aml/train_grader.log",
    benchmark:
        "results/benchmarks/aml/train_grader.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(6000),
        runtime=scaled(120),
        gpu=GPU * TRAIN_DEVICES,
        cpus_per_gpu=2,
    params:
        backbone=config["grading"]["backbone"],
        epochs=config["grading"]["epochs"],
        batch_size=config["grading"]["batch_size"],
        loss_weights=config["grading"]["loss_weights"],
        size=config["aml"]["level_two"]["crop_size"],
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/train_grader.py"


rule aml_level_three:
    """Level Three (seed 003 §2.1.3): the grading network removes the Level Two crops of grades 5-6."""
    input:
        model="results/aml/grader",
        zarr="results/aml/level2/{aml_slide}.zarr",
        index="results/aml/level2/{aml_slide}.parquet",
    output:
        grading="results/aml/level3/{aml_slide}.parquet",
    log:
        "results/logs/aml/level3/{aml_slide}.log",
    benchmark:
        "results/benchmarks/aml/level3/{aml_slide}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(60),
        gpu=GPU,
        cpus_per_gpu=2,
    params:
        threshold=config["aml"]["level_three"]["threshold"],
    script:
        "../scripts/aml_level_three.py"


rule aml_mil:
    """One patient-wise cross-validation fold of one MIL configuration (seed 003 §3): bags of
    crops per slide (Levels Two, Three) or single patches (Level One) -> the slide's class."""
    input:
        unpack(aml_mil_inputs),
    output:
        metrics="results/aml/mil/{task}/{level}/{background}/{mil_backbone}/{attention}/fold{fold}/metrics.json",
        predictions="results/aml/mil/{task}/{level}/{background}/{mil_backbone}/{attention}/fold{fold}/predictions.parquet",
    log:
        "results/logs/aml/mil/{task}/{level}/{background}/{mil_backbone}/{attention}/fold{fold}.log",
    benchmark:
        "results/benchmarks/aml/mil/{task}/{level}/{background}/{mil_backbone}/{attention}/fold{fold}.tsv"
    conda:
        "../envs/ml.yaml"
    threads: 2
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(720),
        gpu=GPU * TRAIN_DEVICES,
        cpus_per_gpu=2,
    params:
        labels=aml_task_labels,
        patients=aml_task_patients,
        classes=aml_task_classes,
        settings=config["aml"]["mil"],
        seed=config["seed"],
        devices=TRAIN_DEVICES,
    script:
        "../scripts/aml_mil.py"


rule aml_report:
    """Seed 003's tables from stored outputs: the reduction table (Table 2 shape), the per-fold
    cross-validation tables (Tables 3-8 shapes) and the accuracy by level (Fig. 3 shape)."""
    input:
        unpack(aml_report_inputs),
    output:
        reduction=report("results/aml/report/reduction.csv", caption="../report/aml_reduction.rst", category="AML"),
        reduction_md="results/aml/report/reduction.md",
        cv_csv=report("results/aml/report/cv_tables.csv", caption="../report/aml_cv.rst", category="AML"),
        cv_md="results/aml/report/cv_tables.md",
        out_of_fold=report("results/aml/report/out_of_fold.csv", caption="../report/aml_oof.rst", category="AML"),
        levels=report("results/aml/report/accuracy_by_level.png", caption="../report/aml_levels.rst", category="AML"),
        skipped="results/aml/report/skipped_slides.csv",
        excluded="results/aml/report/excluded.csv",  # slides that failed (require_all_slides: false)
        provenance="results/aml/report/provenance.json",
    log:
        "results/logs/aml/report.log",
    conda:
        "../envs/report.yaml"
    params:
        labels=AML_LABELS,
        tasks=config["aml"]["tasks"],
        experiments=AML_EXPERIMENTS,
        n_folds=config["aml"]["mil"]["n_folds"],
        min_instances=config["aml"]["mil"]["min_instances"],
        crop_size=config["aml"]["level_two"]["crop_size"],
        patch_size=config["aml"]["level_one"]["patch_size"],
        config_hash=report_config_hash(),
    script:
        "../scripts/aml_report.py"
