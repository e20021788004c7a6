rule extract_crops:
    """One crop per nucleus (80x80 at 40x, 40x40 at 20x), with and without background, into Zarr."""
    input:
        slide="results/slides/{slide}.ome.zarr",
        labels="results/segmentation/{slide}.zarr",
        cells="results/cells/{slide}.parquet",
    output:
        zarr=directory("results/crops/{slide}.zarr"),
        index="results/crops/{slide}.parquet",
    log:
        "results/logs/extract_crops/{slide}.log",
    benchmark:
        "results/benchmarks/extract_crops/{slide}.tsv"
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(30),
    params:
        size=crop_size_of,
        meta=slide_meta,
        classes=config["classes"],
    script:
        "../scripts/extract_crops.py"
