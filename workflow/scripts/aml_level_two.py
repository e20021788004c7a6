import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.reduce.aml_stage import level_two


def run():
    s = snakemake.params.settings
    level_two(
        snakemake.input.zarr,
        snakemake.input.index,
        snakemake.output.zarr,
        snakemake.output.index,
        crop_size=s["crop_size"],
        min_separation=s["min_separation"],
        seed=snakemake.params.seed,
        slide=snakemake.wildcards.aml_slide,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
