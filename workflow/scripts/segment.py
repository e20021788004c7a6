import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import run_slide_stage
from cellstage.segment.stage import segment


def run():
    segment(
        snakemake.input.slide,
        snakemake.input.tubules,
        snakemake.input.model[0] if snakemake.input.model else None,
        snakemake.output.labels,
        method=snakemake.params.method,
        tile=snakemake.params.tile,
        overlap=snakemake.params.overlap,
        diameter=snakemake.params.diameter,
        threads=snakemake.threads,
        region_classes=snakemake.params.region_classes,
    )


# the per-slide stage, or an exclusion marker with require_all_slides: false (cellstage.exclusion)
run_slide_stage(snakemake, run)
