"""Cross-scan positives: a cell's crop on one scan and its registered crop on the other scan are
the two views of a joint-embedding method (issue 12 item 5; no paper of the project does this).

Seed 000 scans every section twice (§3.1: a 20× single-plane scan and a 40× extended-focus scan),
registers the two (§3.1) and finds that the scan setting changes what both annotators (§4.1,
Table 3: Top-1 50-60.4 % between the settings) and networks (§4.2-4.3) see. Pairing the two
scans of one cell as positives asks the backbone for features that do not depend on the scan:
focus, resolution and the scanner's colour response become nuisances, like the usual
augmentations.

The crops of a cell on both scans share ``(section, cell_id)`` (the moving scan's cells are
mapped onto the reference scan's nuclei: rule ``map_cells``; the folds use the same key). For a
lightly ``MultiViewTransform`` (SimCLR, DINO, SimSiam) view ``k`` is drawn from the run's own
crop for even ``k`` and from the partner crop for odd ``k``, so SimCLR's and SimSiam's two views
and DINO's two global views are always one of each scan (DINO's local views alternate). The
partner crop is resized to the run's crop size first (bicubic), since both crops cover the same
field of view (40×40 px at 20×, 80×80 px at 40×). Every view then gets its usual augmentations.
Cells without a crop on the partner scan are left out of the pool (counted and logged).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..utils import CellstageError

log = logging.getLogger("cellstage.ssl")

__all__ = ["CROSS_SCAN_METHODS", "CrossScanDataset", "pair_rows"]

CROSS_SCAN_METHODS = ("simclr", "dino", "simsiam", "dense_simsiam")  # joint-embedding methods with 2+ views
KEY = ["section", "cell_id"]


def pair_rows(index: pd.DataFrame, partner: pd.DataFrame, *,
              where: str = "pretrain") -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of ``index`` that have a crop of the same ``(section, cell_id)`` in ``partner``, and
    for each of them the position of that crop in ``partner`` (the first when there are several)."""
    for name, frame in (("crop index", index), ("partner crop index", partner)):
        missing = [k for k in KEY if k not in frame.columns]
        if missing:
            raise CellstageError(f"{where}: the {name} lacks {missing}; cross-scan pairs are matched on {KEY}")
    part = partner.reset_index(drop=True)
    part = part.assign(_pos=np.arange(len(part)), cell_id=part["cell_id"].astype("int64"),
                       section=part["section"].astype(str))
    first = part.drop_duplicates(KEY)[[*KEY, "_pos"]]
    keyed = index.reset_index(drop=True).assign(cell_id=index["cell_id"].astype("int64").to_numpy(),
                                                section=index["section"].astype(str).to_numpy())
    merged = keyed.merge(first, on=KEY, how="left")
    has = merged["_pos"].notna().to_numpy()
    if not has.any():
        raise CellstageError(
            f"{where}: none of the {len(index)} crops has a crop of the same (section, cell_id) on the partner "
            "scan; are the partner scan's cells mapped onto this scan's (rule map_cells), and does the "
            "partner scan have crops of these sections?"
        )
    if not has.all():
        log.info("%s: %d of %d crops have no crop on the partner scan and are left out", where,
                 int((~has).sum()), len(index))
    rows = index.reset_index(drop=True)[has].reset_index(drop=True)
    return rows, merged.loc[has, "_pos"].to_numpy(dtype=np.int64)


class CrossScanDataset(Dataset):
    """``(views, distance, label)`` like :class:`cellstage.training.data.ZarrCropDataset` with a
    multi-view transform, the odd views drawn from the cell's crop on the partner scan.

    ``own`` and ``partner``: :class:`~cellstage.training.data.ZarrCropDataset` over the run's crops
    and the partner scan's crops, both without transform; ``positions[i]``: the partner crop of
    row ``i`` of ``own`` (:func:`pair_rows`); ``transform``: a lightly ``MultiViewTransform``.
    """

    def __init__(self, own, partner, positions: np.ndarray, transform) -> None:
        views = getattr(transform, "transforms", None)
        if not views or len(views) < 2:
            raise CellstageError("cross-scan positives need a method with two or more views (SimCLR, DINO, SimSiam)")
        if len(positions) != len(own):
            raise ValueError(f"{len(positions)} partner positions for {len(own)} crops")
        self.own, self.partner, self.positions, self.views = own, partner, np.asarray(positions), list(views)

    def __len__(self) -> int:
        return len(self.own)

    def image(self, i: int) -> np.ndarray:
        return self.own.image(i)

    def __getitem__(self, i: int):
        from PIL import Image

        own = Image.fromarray(self.own.image(i))
        other = Image.fromarray(self.partner.image(int(self.positions[i])))
        if other.size != own.size:
            other = other.resize(own.size, Image.BICUBIC)
        views = [t(own if k % 2 == 0 else other) for k, t in enumerate(self.views)]
        return views, torch.tensor(self.own._dist[i], dtype=torch.float32), int(self.own._labels[i])
