rule register:
    """ORB keypoints + Hamming matching + RANSAC homography from the section's reference scan to one
    other scan of it (one job per moving slide: a section may have any number of scans)."""
    input:
        unpack(registration_inputs),
    output:
        registration="results/registration/{mov_slide}.json",
        overlay=report(
            "results/registration/{mov_slide}.png",
            caption="../report/registration.rst",
            category="Registration",
        ),
    log:
        "results/logs/register/{mov_slide}.log",
    benchmark:
        "results/benchmarks/register/{mov_slide}.tsv"
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    params:
        n_features=config["registration"]["n_features"],
        ransac_threshold=config["registration"]["ransac_threshold"],
        min_inliers=config["registration"]["min_inliers"],
        min_inlier_ratio=config["registration"]["min_inlier_ratio"],
        coarse_max_side=config["registration"]["coarse_max_side"],
    script:
        "../scripts/register.py"


rule map_cells:
    """Cells, nucleus labels, tubules and points of the reference scan mapped onto one other scan
    with that scan's own registration; whatever lands outside the slide is listed in the
    .outside.csv, never clipped."""
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
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(3000),
        runtime=scaled(30),
    params:
        region_classes=config["annotations"]["region_classes"],
    script:
        "../scripts/map_cells.py"
