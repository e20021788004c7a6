import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.report.annotators import run_annotator_study
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    outputs = {k: v for k, v in snakemake.output.items()}
    run_annotator_study(
        snakemake.input.sheet,
        outputs,
        classes=list(snakemake.params.classes),
        static_classes=list(snakemake.params.static_classes),
        scans=list(snakemake.params.scans),
        reference_scan=snakemake.params.reference_scan,
        separator=snakemake.params.separator,
    )
