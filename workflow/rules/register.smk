rule register:
    """ORB keypoints + Hamming matching + RANSAC homography between the two scans of a section."""
    input:
        unpack(pair_inputs),
    output:
        registration="results/registration/{section}.json",
        overlay=report(
            "results/registration/{section}.png",
            caption="../report/registration.rst",
            category="Registration",
        ),
    params:
        reg=config["registration"],
    log:
        "results/logs/register/{section}.log",
    benchmark:
        "results/benchmarks/register/{section}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    conda:
        "../envs/io.yaml"
    script:
        "../scripts/register.py"


rule map_cells:
    """Cells, nucleus labels, tubules and points of the reference scan mapped onto the other scan;
    whatever lands outside that slide is listed in the .outside.csv, never clipped."""
    input:
        unpack(mapped_cells_inputs),
    output:
        cells="results/cells/{mov_slide}.parquet",
        labels=directory("results/segmentation/{mov_slide}.zarr"),
        tubules="results/annotations/{mov_slide}.tubules.geojson",
        points="results/annotations/{mov_slide}.points.geojson",
        outside="results/annotations/{mov_slide}.outside.csv",
    log:
        "results/logs/map_cells/{mov_slide}.log",
    benchmark:
        "results/benchmarks/map_cells/{mov_slide}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    conda:
        "../envs/io.yaml"
    script:
        "../scripts/map_cells.py"
