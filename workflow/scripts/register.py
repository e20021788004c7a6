import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.register.stage import register


def run():
    register(
        snakemake.input.ref,
        snakemake.input.mov,
        snakemake.output.registration,
        snakemake.output.overlay,
        n_features=snakemake.params.n_features,
        ransac_threshold=snakemake.params.ransac_threshold,
        min_inliers=snakemake.params.min_inliers,
        min_inlier_ratio=snakemake.params.min_inlier_ratio,
        coarse_max_side=snakemake.params.coarse_max_side,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
