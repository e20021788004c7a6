rule convert:
    """Vendor slide -> chunked multiscale OME-Zarr with physical pixel size, tile by tile."""
    input:
        slide_file,
    output:
        directory("results/slides/{slide}.ome.zarr"),
    wildcard_constraints:
        slide=_alt([s for s in SLIDES if s not in BIOFORMATS_SLIDES]),
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


rule convert_bioformats:
    """The same conversion for slides whose sheet backend is `bioformats`, run in the Bio-Formats
    environment (python-javabridge needs numpy<2 and Java): with --use-conda that is
    envs/bioformats.yaml, otherwise the interpreter of config `bioformats_python`
    (`make setup-bioformats` builds .venv-bioformats)."""
    input:
        slide_file,
    output:
        directory("results/slides/{slide}.ome.zarr"),
    wildcard_constraints:
        slide=_alt(BIOFORMATS_SLIDES),
    params:
        python=(
            "python"
            if any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method)
            else config["bioformats_python"]
        ),
        src=str(Path(workflow.basedir) / "src"),
        mpp=lambda wildcards: (
            f"--mpp {slides.loc[wildcards.slide, 'mpp']}" if slides.loc[wildcards.slide, "mpp"] else ""
        ),
        tile=config["convert"].get("tile", 512),
    log:
        "results/logs/convert/{slide}.log",
    benchmark:
        "results/benchmarks/convert/{slide}.tsv"
    threads: 1
    resources:
        mem_mb=scaled(4000),  # the JVM (heap up to CELLSTAGE_BIOFORMATS_HEAP, default 2g) + Python
        runtime=scaled(60),
    conda:
        "../envs/bioformats.yaml"
    shell:
        "PYTHONPATH={params.src:q}${{PYTHONPATH:+:$PYTHONPATH}} {params.python} -m cellstage.cli convert "
        "{input:q} {output:q} --backend bioformats {params.mpp} --tile {params.tile} > {log:q} 2>&1"
