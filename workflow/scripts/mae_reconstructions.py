from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.ssl.stage import mae_reconstructions
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    mae_reconstructions(
        Path(inputs.pretrain).parent,  # pretrain.json, backbone.safetensors, heads.safetensors
        list(inputs.val_zarr),
        list(inputs.val_index),
        snakemake.output[0],
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
