import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.crops.stage import extract_crops
from cellstage.exclusion import run_slide_stage


def run():
    extract_crops(
        snakemake.input.slide,
        snakemake.input.labels,
        snakemake.input.cells,
        snakemake.output.zarr,
        snakemake.output.index,
        size=snakemake.params.size,
        meta=snakemake.params.meta,
        classes=snakemake.params.classes,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
