import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.reduce.aml_stage import level_two
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
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
