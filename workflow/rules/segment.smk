rule train_segmenter:
    """Cellpose trained on the sheet's nucleus masks (from `segmentation.pretrained` when given)."""
    input:
        unpack(segmenter_inputs),
    output:
        model="results/segmenter/model",
        metrics="results/segmenter/model.json",
    params:
        seg=segmenter_training_params(),
        seed=config["seed"],
    log:
        "results/logs/train_segmenter.log",
    benchmark:
        "results/benchmarks/train_segmenter.tsv"
    threads: 2
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(240),
        gpu=GPU,
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    conda:
        "../envs/seg.yaml"
    script:
        "../scripts/train_segmenter.py"


rule segment:
    """Tiled Cellpose over level 0 inside the tubules, stitched across tile borders."""
    input:
        slide="results/slides/{ref_slide}.ome.zarr",
        tubules=tubules_of,
        model=segmenter_model,
    output:
        labels=directory("results/segmentation/{ref_slide}.zarr"),
    params:
        seg=segmenter_inference_params(),
    log:
        "results/logs/segment/{ref_slide}.log",
    benchmark:
        "results/benchmarks/segment/{ref_slide}.tsv"
    threads: 2
    resources:
        mem_mb=scaled(6000),
        runtime=scaled(240),
        gpu=GPU,
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    conda:
        "../envs/seg.yaml"
    script:
        "../scripts/segment.py"


rule cells:
    """Per-nucleus table: morphology, tubule, distance to the tubule wall, annotated class."""
    input:
        labels="results/segmentation/{ref_slide}.zarr",
        slide="results/slides/{ref_slide}.ome.zarr",
        tubules=tubules_of,
        points=points_of,
    output:
        cells="results/cells/{ref_slide}.parquet",
        geojson="results/cells/{ref_slide}.geojson",
    params:
        classes=config["classes"],
        match_radius_px=config["segmentation"].get("match_radius_px", 10),
    log:
        "results/logs/cells/{ref_slide}.log",
    benchmark:
        "results/benchmarks/cells/{ref_slide}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    conda:
        "../envs/seg.yaml"
    script:
        "../scripts/cells.py"
