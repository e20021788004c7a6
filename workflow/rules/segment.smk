rule train_segmenter:
    """Cellpose trained on the sheet's nucleus masks (from `segmentation.pretrained` when given)."""
    input:
        unpack(segmenter_inputs),
    output:
        model="results/segmenter/model",
        metrics="results/segmenter/model.json",
        ap=report("results/segmenter/ap.csv", caption="../report/segmenter.rst", category="Segmentation"),
    log:
        "results/logs/train_segmenter.log",
    benchmark:
        "results/benchmarks/train_segmenter.tsv"
    conda:
        "../envs/seg.yaml"
    threads: 2
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(240),
        gpu=GPU,
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        pretrained=config["segmentation"]["pretrained"],
        diameter=config["segmentation"]["diameter"],
        epochs=config["segmentation"]["epochs"],
        learning_rate=config["segmentation"]["learning_rate"],
        batch_size=config["segmentation"]["batch_size"],
        bsize=config["segmentation"]["bsize"],
        diam_mean=config["segmentation"]["diam_mean"],
        nimg_per_epoch=config["segmentation"]["nimg_per_epoch"],
        eval_tiles=config["segmentation"]["eval_tiles"],
        seed=config["seed"],
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
    log:
        "results/logs/segment/{ref_slide}.log",
    benchmark:
        "results/benchmarks/segment/{ref_slide}.tsv"
    conda:
        "../envs/seg.yaml"
    threads: 2
    resources:
        mem_mb=scaled(6000),
        runtime=scaled(240),
        gpu=GPU,
        cpus_per_gpu=2,  # CPU cores per GPU when gpus_per_job > 0 (= threads)
    params:
        method=config["segmentation"]["method"],
        tile=config["segmentation"]["tile"],
        overlap=config["segmentation"]["overlap"],
        diameter=config["segmentation"]["diameter"],
        region_classes=config["annotations"]["region_classes"],
    script:
        "../scripts/segment.py"


rule cells:
    """Per-nucleus table: morphology, tubule, distance to the tubule wall, annotated class; plus one row
    per annotated point that matched no nucleus (cropped at the point) and the per-point list."""
    input:
        labels="results/segmentation/{ref_slide}.zarr",
        slide="results/slides/{ref_slide}.ome.zarr",
        tubules=tubules_of,
        points=points_of,
    output:
        cells="results/cells/{ref_slide}.parquet",
        geojson="results/cells/{ref_slide}.geojson",
        points="results/cells/{ref_slide}.points.csv",
    log:
        "results/logs/cells/{ref_slide}.log",
    benchmark:
        "results/benchmarks/cells/{ref_slide}.tsv"
    conda:
        "../envs/seg.yaml"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    params:
        classes=config["classes"],
        match_radius_px=config["segmentation"]["match_radius_px"],
        min_points_on_nuclei=config["segmentation"]["min_points_on_nuclei"],
        region_classes=config["annotations"]["region_classes"],
    script:
        "../scripts/cells.py"
