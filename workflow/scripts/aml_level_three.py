import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.reduce.aml_stage import grade_level_two


def run():
    grade_level_two(
        snakemake.input.model,
        snakemake.input.zarr,
        snakemake.input.index,
        snakemake.output.grading,
        threshold=snakemake.params.threshold,
        threads=snakemake.threads,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
