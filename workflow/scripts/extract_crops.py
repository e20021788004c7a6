import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.crops.stage import extract_crops
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
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
