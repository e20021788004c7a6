import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.io.stage import convert


def run():
    convert(
        snakemake.input[0],
        snakemake.output[0],
        backend=snakemake.params.backend,
        mpp=snakemake.params.mpp,
        tile=snakemake.params.tile,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
