import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.cells.stage import cells
from cellstage.exclusion import run_slide_stage


def run():
    cells(
        snakemake.input.labels,
        snakemake.input.slide,
        snakemake.input.tubules,
        snakemake.input.points[0] if snakemake.input.points else None,
        snakemake.output.cells,
        geojson=snakemake.output.geojson,
        out_points=snakemake.output.points,
        slide_id=snakemake.wildcards.ref_slide,
        classes=snakemake.params.classes,
        match_radius_px=snakemake.params.match_radius_px,
        min_points_on_nuclei=snakemake.params.min_points_on_nuclei,
        region_classes=snakemake.params.region_classes,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
