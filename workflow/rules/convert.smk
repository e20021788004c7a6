rule convert:
    """Vendor slide -> chunked multiscale OME-Zarr with physical pixel size, tile by tile."""
    input:
        slide_file,
    output:
        directory("results/slides/{slide}.ome.zarr"),
    params:
        backend=sheet_value("backend"),
        mpp=sheet_value("mpp"),
        tile=config["convert"].get("tile", 512),
    log:
        "results/logs/convert/{slide}.log",
    benchmark:
        "results/benchmarks/convert/{slide}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(60),
    conda:
        "../envs/io.yaml"
    script:
        "../scripts/convert.py"
