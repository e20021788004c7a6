rule convert:
    """Vendor slide -> chunked multiscale OME-Zarr with physical pixel size, tile by tile."""
    input:
        slide_file,
    output:
        directory("results/slides/{slide}.ome.zarr"),
    log:
        "results/logs/convert/{slide}.log",
    benchmark:
        "results/benchmarks/convert/{slide}.tsv"
    wildcard_constraints:
        slide=_alt([s for s in SHEET.index if s not in BIOFORMATS_SLIDES]),
    conda:
        "../envs/io.yaml"
    threads: 1
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(60),
    params:
        backend=sheet_value("backend"),
        mpp=sheet_value("mpp"),
        tile=config["convert"]["tile"],
    script:
        "../scripts/convert.py"


rule convert_bioformats:
    """The same conversion for slides whose sheet backend is `bioformats`, run in the Bio-Formats
    environment (python-javabridge needs numpy<2 and Java): with --use-conda that is
    envs/bioformats.yaml, otherwise the interpreter of config `bioformats_python`
    (`make setup-bioformats` builds .venv-bioformats)."""
    input:
        slide_file,
    output:
        directory("results/slides/{slide}.ome.zarr"),
    log:
        "results/logs/convert/{slide}.log",
    benchmark:
        "results/benchmarks/convert/{slide}.tsv"
    wildcard_constraints:
        slide=_alt(BIOFORMATS_SLIDES),
    conda:
        "../envs/bioformats.yaml"
    threads: 1
    resources:
        mem_mb=scaled(4000),  # the JVM (heap up to CELLSTAGE_BIOFORMATS_HEAP, default 2g) + Python
        runtime=scaled(60),
    params:
        python=(
            "python"
            if any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method)
            else config["bioformats_python"]
        ),
        src=str(Path(workflow.basedir) / "src"),
        mpp=mpp_option,
        tile=config["convert"]["tile"],
    shell:
        "PYTHONPATH={params.src:q}${{PYTHONPATH:+:$PYTHONPATH}} {params.python} -m cellstage.cli convert "
        "{input:q} {output:q} --backend bioformats {params.mpp} --tile {params.tile} > {log:q} 2>&1"
