from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.extract_crops(
        snakemake.input.slide,
        snakemake.input.labels,
        snakemake.input.cells,
        snakemake.output.zarr,
        snakemake.output.index,
        size=snakemake.params.size,
        meta=snakemake.params.meta,
        classes=snakemake.params.classes,
    )
