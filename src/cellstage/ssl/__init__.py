"""Self-supervised pretraining on unlabelled crops (seed 000: SimCLR, DINO, MAE; seed 001:
pseudo-colourising masked cells; seed 002: autoencoder; seed 004: SimSiam, dense SimSiam).

``METHODS[name]`` is a :class:`MethodSpec` with the LightningModule class and a transform
factory ``make_transform(img_size, **overrides)`` (lightly transforms for the crop size).
Entry point: :func:`cellstage.ssl.pretrain.pretrain` (seed 000 §4.3 protocol: unlabelled pool,
validation loss on the labelled train crops, best epoch exported); settings per method and
backbone: :mod:`cellstage.ssl.settings`; MAE reconstructions (Fig. A.2):
:func:`cellstage.ssl.stage.mae_reconstructions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import CROSS_SCAN_SUFFIX
from . import autoencoder, ctfm, dino, mae, pseudocolor, simclr, simsiam


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: type
    make_transform: Callable
    vit_only: bool = False
    cross_scan: bool = False  # the odd views come from the cell's crop on the partner scan (.crossscan)
    # a cross-scan method's own dataset (own, partner, positions, transform, method_kwargs); None: CrossScanDataset
    paired_dataset: Callable | None = None


METHODS: dict[str, MethodSpec] = {
    "simclr": MethodSpec("simclr", simclr.SimCLR, simclr.make_transform),
    "dino": MethodSpec("dino", dino.DINO, dino.make_transform),
    "mae": MethodSpec("mae", mae.MAE, mae.make_transform, vit_only=True),
    "autoencoder": MethodSpec("autoencoder", autoencoder.Autoencoder, autoencoder.make_transform),
    "simsiam": MethodSpec("simsiam", simsiam.SimSiam, simsiam.make_transform),
    "dense_simsiam": MethodSpec("dense_simsiam", simsiam.DenseSimSiam, simsiam.make_transform),
    "pseudocolor": MethodSpec("pseudocolor", pseudocolor.PseudoColor, pseudocolor.make_transform),
}
# cross-scan positives (issue 12 item 5): the same methods, one view per scan of a cell; runnable as
# `init: simclr_xscan` etc. beside the plain method (their own pretrain.methods.<name> settings block)
METHODS.update({
    f"{name}{CROSS_SCAN_SUFFIX}": MethodSpec(f"{name}{CROSS_SCAN_SUFFIX}", METHODS[name].module,
                                             METHODS[name].make_transform, cross_scan=True)
    for name in ("simclr", "dino", "simsiam", "dense_simsiam")
})
# seed 004 CTFM (issue 12 item 4): 20x context field + 40x target crops of the partner scan
METHODS["ctfm"] = MethodSpec("ctfm", ctfm.CTFM, ctfm.make_transform, cross_scan=True,
                             paired_dataset=ctfm.paired_dataset)


from .pretrain import pretrain  # noqa: E402  (the function shadows the submodule name)

__all__ = ["METHODS", "MethodSpec", "pretrain"]
