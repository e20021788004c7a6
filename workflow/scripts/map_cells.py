import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.register.stage import map_cells


def run():
    map_cells(
        snakemake.input.registration,
        snakemake.input.cells,
        snakemake.input.labels,
        snakemake.input.slide,
        snakemake.output.cells,
        snakemake.output.labels,
        slide_id=snakemake.wildcards.mov_slide,
        tubules=snakemake.input.tubules,
        points=snakemake.input.get("points"),
        out_tubules=snakemake.output.tubules,
        out_points=snakemake.output.points,
        out_outside=snakemake.output.outside,
        region_classes=snakemake.params.region_classes,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
