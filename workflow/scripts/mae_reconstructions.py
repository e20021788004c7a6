from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.ssl.stage import mae_reconstructions
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    mae_reconstructions(
        Path(snakemake.input.pretrain).parent,  # pretrain.json, backbone.safetensors, heads.safetensors
        list(snakemake.input.val_zarr),
        list(snakemake.input.val_index),
        snakemake.output[0],
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
