import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.io.stage import convert
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    convert(
        snakemake.input[0],
        snakemake.output[0],
        backend=snakemake.params.backend,
        mpp=snakemake.params.mpp,
        tile=snakemake.params.tile,
    )
