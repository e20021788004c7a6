import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.reduce.aml_stage import level_one


def run():
    s = snakemake.params.settings
    level_one(
        snakemake.input.slide,
        snakemake.output.zarr,
        snakemake.output.index,
        grid=tuple(s["grid"]),
        keep_rows=tuple(s["keep_rows"]),
        keep_cols=tuple(s["keep_cols"]),
        patch_size=s["patch_size"],
        blur_threshold=s["blur_threshold"],
        kmeans_k=s["kmeans_k"],
        criterion=s["criterion"],
        min_cells=s["min_cells"],
        max_cells=s["max_cells"],
        max_cell_area=s["max_cell_area"],
        min_cell_area=s["min_cell_area"],
        closing_radius=s["closing_radius"],
        min_contrast=s["min_contrast"],
        seed=snakemake.params.seed,
        slide=snakemake.wildcards.aml_slide,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
