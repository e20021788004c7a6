import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.register.stage import register
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
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
