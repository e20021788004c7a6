from pathlib import Path

import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.ssl.probe import probe
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake)
    probe(
        Path(inputs.weights).parent,  # pretrain.json, backbone.safetensors
        list(inputs.val_zarr),
        list(inputs.val_index),
        snakemake.output[0],
        stain_zarr_paths=list(inputs.get("stain_zarr", [])),
        stain_index_paths=list(inputs.get("stain_index", [])),
        classes=list(snakemake.params.classes),
        static_classes=list(snakemake.params.static_classes),
        n_folds=snakemake.params.n_folds,
        group_by=snakemake.params.group_by,
        k=snakemake.params.k,
        C=snakemake.params.C,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
