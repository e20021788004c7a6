from cellstage import stages
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    stages.map_cells(
        snakemake.input.registration,
        snakemake.input.cells,
        snakemake.input.labels,
        snakemake.input.slide,
        snakemake.output.cells,
        snakemake.output.labels,
        slide_id=snakemake.wildcards.mov_slide,
    )
