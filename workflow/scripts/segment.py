import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.segment.stage import segment
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
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
