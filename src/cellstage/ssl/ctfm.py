"""Context-target fusion with a masked jigsaw (CTFM; seed 004, Wang et al., DSF-WSI §III-D, Fig. 2b,
Eq. 3-5, 8) on the two scans of a section: a dual-branch SimSiam whose context branch sees a wide
20× field around a cell and whose target branch sees the 40× crops of the cells inside that field.

Seed 004 §III-D: "a dual-branch model consisting of two identical backbone models, with weights
not shared"; low-resolution *context* patches go through the context branch, high-resolution
*target* patches through the target branch, each trained with SimSiam (Eq. 3 L_c, Eq. 4 L_t).
"Since a single context image c_i corresponds to multiple target images {t_i^1, ..., t_i^m} ...
target features were shuffled and randomly masked out with a predefined ratio. The cross-branch
feature q_fu ... was then derived from the concatenation of context features and processed target
features"; the *masked jigsaw* task maximises the similarity of the cross-branch features of two
views (Eq. 5 L_fu). §IV-B: "The resolution difference between the branches was set to a ratio of
4 : 1, and the random masking ratio was set to 0.5"; dense SimSiam stage weights
{0.1, 0.4, 0.7, 1.0}; Eq. 8: L = L_DSL,c + L_DSL,t + L_DSL,fu (each of the three tasks on every
backbone stage, Eq. 6-7: "12 projectors and 12 predictors" for ResNet-18). Table I: Adam, lr 1e-3,
batch 32 (500 / 300 epochs). Table V (BCSS F1): only CTFM 0.7881, CTFM + DSL 0.8072; only jigsaw
0.7753, only masking 0.7773.

How the paper's tiles map onto this project's cell crops (issue 12 item 4):

- *Scans*: the target branch gets the 40× crops, the context branch the 20× field (resolution
  ratio 2 : 1 here, 4 : 1 in the paper). Which of the two crop sources is which is read from the
  crop size: both scans' crops cover the same field of view (80 px at 40×, 40 px at 20×), so the
  source with the larger crops is the higher magnification (the target).
- *Context field*: ``context_scale`` (default 2) crop edges wide around the anchor cell: 80 px of
  the 20× scan = 27.2 µm. With the 2 : 1 ratio such a field holds 2 × 2 target-crop fields,
  as the paper's 10× patch holds 4 × 4 of its 40× patches (§IV-A: "each context patch (10×)
  had 16 corresponding target patches (40×)"). The 20× crop of the cell alone covers only the
  40× crop's field (13.6 µm: one cell and its rim), no context. The field is assembled from the
  20× crop store rather than re-read from the slide: every 20× crop whose window overlaps the
  field is pasted at its cell's 20× position (``centroid_x/y`` of the 20× crop index: the cell's
  position mapped through the registration, rule ``map_cells``). The crops are cut from the same
  slide pixels, so wherever a crop covers the field the field *is* the slide; pixels farther than
  half a crop (6.8 µm) from every cell centre (lumen, acellular stroma) are white (255), like the
  crops' padding outside the slide; ``masked`` crops are combined with a pixel maximum (every
  nucleus of the field on black). This needs no input beyond the partner scan's crop store that
  the cross-scan methods already get.
- *Targets*: the ``n_targets`` (default 4 = the 2 × 2 target fields of a context field) cells of
  the same section nearest to the anchor whose 40× centres (``centroid_x/y`` of the 40× crop
  index, 40× level-0 px) fall inside the field (|dx|, |dy| <= context_scale · crop_40 / 2); the
  anchor itself is the nearest. Fewer cells are padded by repeating the found ones in order.
  The cells considered are the ones the run has of each scan: the partner scan's whole crop index,
  or the run's own rows (the pool after keep-lists and ``max_crops``, or the validation cells).
- *Views*: two lightly ``SimSiamTransform`` views of the context field and of each target crop,
  each resized to ``img_size`` (as the paper resizes both context and target patches to 224 px).
- *CTFM*: per view and sample, the K target features are shuffled (a random permutation) and
  ``round(mask_ratio · K)`` of them set to zero, then concatenated after the context feature:
  (1 + K) · d. The same jigsaw is applied at every stage; the two views draw their own.
- *Heads*: per task (context, target, fusion) and stage a lightly SimSiam projector (hidden =
  output = input width; for the fusion the concatenated width) and predictor (hidden a quarter).
  ``stage_weights`` defaults to seed 004's dense weights (one weight: plain SimSiam on the pooled
  output, Table V "only CTFM").
- *Export*: ``export="target"`` (default) writes the 40× cell backbone, ``"context"`` the 20×
  field backbone; the other one (and the heads) go to ``heads.safetensors``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..utils import CellstageError
from .base import SSLModule, is_vit

log = logging.getLogger("cellstage.ssl")

__all__ = ["CTFM", "ContextTargetDataset", "apply_jigsaw", "field_cells", "jigsaw", "make_transform", "masked_jigsaw",
           "paste_field"]

N_TARGETS = 4  # 2 x 2 target-crop fields per context field at 20x : 40x (seed 004: 4 x 4 at 10x : 40x)
CONTEXT_SCALE = 2.0  # context field edge / crop edge
MASK_RATIO = 0.5  # seed 004 §IV-B
EXPORTS = ("target", "context")
BRANCHES = ("context", "target", "fusion")
POSITION = ["section", "centroid_x", "centroid_y"]


def make_transform(img_size: int, **overrides):
    """Seed 004 §IV-B: "the default data transformation settings from SimSiam" (lightly
    ``SimSiamTransform``), applied to the context field and to every target crop."""
    from lightly.transforms import SimSiamTransform

    return SimSiamTransform(input_size=img_size, **overrides)


# --------------------------------------------------------------------------- fields
def _positions(frame, where: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in POSITION if c not in frame.columns]
    if missing:
        raise CellstageError(f"ctfm: the {where} lacks column(s) {missing}; fields are built from the cells' "
                             "section and centroid_x/centroid_y (docs/contracts.md, crop index columns)")
    xy = frame[["centroid_x", "centroid_y"]].to_numpy(dtype=np.float64)
    if not np.isfinite(xy).all():
        raise CellstageError(f"ctfm: the {where} has non-finite centroid_x/centroid_y")
    return frame["section"].astype(str).to_numpy(), xy


def field_cells(anchor_sections, anchor_xy, sections, xy, half: float, k: int | None = None) -> list[np.ndarray]:
    """For every anchor, the cells (positions in ``sections``/``xy``) of the same section whose
    centres lie inside the square field of half-edge ``half`` around it (|dx|, |dy| <= half),
    nearest first (Euclidean; ties by position). ``k``: keep the ``k`` nearest and pad to ``k`` by
    repeating the found ones in order (an anchor's own cell, at distance 0, is always found)."""
    from sklearn.neighbors import KDTree

    anchor_sections, sections = np.asarray(anchor_sections).astype(str), np.asarray(sections).astype(str)
    anchor_xy, xy = np.asarray(anchor_xy, dtype=np.float64), np.asarray(xy, dtype=np.float64)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * len(anchor_xy)
    for section in np.unique(anchor_sections):
        members = np.flatnonzero(sections == section)
        queries = np.flatnonzero(anchor_sections == section)
        if len(members) == 0:
            continue
        tree = KDTree(xy[members])
        found, dist = tree.query_radius(anchor_xy[queries], r=half * np.sqrt(2.0) + 1e-9,
                                        return_distance=True)
        for q, cand, d in zip(queries, found, dist):
            inside = (np.abs(xy[members[cand]] - anchor_xy[q]) <= half + 1e-9).all(axis=1)
            cand, d = members[cand[inside]], d[inside]
            cells = cand[np.lexsort((cand, d))]
            if k is not None and len(cells):
                cells = np.resize(cells[:k], k)  # pad by repeating the found cells in order
            out[q] = cells.astype(np.int64)
    return out


def paste_field(crops: Sequence[np.ndarray], origins: np.ndarray, field_origin: Sequence[int], field: int,
                *, masked: bool) -> np.ndarray:
    """A ``field`` x ``field`` RGB image whose top-left is at ``field_origin`` (x, y), assembled from
    crops whose top-left corners are ``origins`` (N, 2: x, y) in the same pixel grid. ``masked``:
    crops combine by a pixel maximum on black (background-free crops); else a crop's pixels are the
    slide's and uncovered pixels are white (255)."""
    canvas = np.zeros((field, field, 3), np.uint8)
    covered = np.zeros((field, field), bool)
    fx, fy = int(field_origin[0]), int(field_origin[1])
    for crop, (ox, oy) in zip(crops, np.asarray(origins, dtype=np.int64)):
        h, w = crop.shape[:2]
        x0, y0 = max(ox - fx, 0), max(oy - fy, 0)
        x1, y1 = min(ox - fx + w, field), min(oy - fy + h, field)
        if x1 <= x0 or y1 <= y0:
            continue
        part = crop[y0 - (oy - fy): y1 - (oy - fy), x0 - (ox - fx): x1 - (ox - fx)]
        region = canvas[y0:y1, x0:x1]
        region[...] = np.maximum(region, part) if masked else part
        covered[y0:y1, x0:x1] = True
    if not masked:
        canvas[~covered] = 255
    return canvas


class ContextTargetDataset(Dataset):
    """``(views, distance, label)`` per anchor cell: ``views = [context_1, context_2, targets_1,
    targets_2]``, a context view (3, S, S) and the target views (K, 3, S, S), S = ``img_size``.

    ``own``: :class:`~cellstage.training.data.ZarrCropDataset` of the anchors (the run's crops);
    ``partner``: the partner scan's crops (its whole index); ``positions[i]``: the partner crop of
    anchor ``i`` (:func:`cellstage.ssl.crossscan.pair_rows`); ``transform``: a lightly
    ``MultiViewTransform`` of two views. Fields: see the module docstring.
    """

    def __init__(self, own, partner, positions: np.ndarray, transform, *, n_targets: int = N_TARGETS,
                 context_scale: float = CONTEXT_SCALE) -> None:
        views = list(getattr(transform, "transforms", None) or [])
        if len(views) != 2:
            raise CellstageError(f"ctfm: the view transform must give two views (SimSiam), got {len(views)}")
        if len(positions) != len(own):
            raise ValueError(f"{len(positions)} partner positions for {len(own)} crops")
        if int(n_targets) < 1:
            raise CellstageError(f"pretrain.methods.ctfm.n_targets: must be >= 1, got {n_targets}")
        if not float(context_scale) >= 1.0:
            raise CellstageError(f"pretrain.methods.ctfm.context_scale: must be >= 1 (a field at least one crop "
                                 f"wide), got {context_scale}")
        self.own, self.partner, self.views = own, partner, views
        self.n_targets, self.context_scale = int(n_targets), float(context_scale)
        positions = np.asarray(positions, dtype=np.int64)
        own_size, partner_size = own.image(0).shape[0], partner.image(0).shape[0]
        if own_size == partner_size:
            raise CellstageError(
                f"ctfm: the crops of both scans are {own_size} px; the target (higher-magnification) scan's crops "
                "must be larger, as both cover the same field of view (config scans.<scan>.crop_size: 80 at 40x, "
                "40 at 20x)")
        own_rows = np.arange(len(own), dtype=np.int64)
        if own_size > partner_size:  # the run's scan is the 40x (target) one
            self.target, self.context = own, partner
            self.anchor_target, self.anchor_context = own_rows, positions
        else:
            self.target, self.context = partner, own
            self.anchor_target, self.anchor_context = positions, own_rows
        self.target_size, self.context_size = max(own_size, partner_size), min(own_size, partner_size)
        self.field_px = int(round(self.context_scale * self.context_size))  # context field edge, 20x px
        t_sections, t_xy = _positions(self.target.index, "target (40x) crop index")
        c_sections, c_xy = _positions(self.context.index, "context (20x) crop index")
        self._c_xy = c_xy
        # targets: cells whose 40x centres lie inside the field, K nearest, padded
        self.targets = field_cells(t_sections[self.anchor_target], t_xy[self.anchor_target], t_sections, t_xy,
                                   half=self.context_scale * self.target_size / 2, k=self.n_targets)
        # context tiles: 20x crops whose windows can overlap the field
        self.tiles = field_cells(c_sections[self.anchor_context], c_xy[self.anchor_context], c_sections, c_xy,
                                 half=(self.field_px + self.context_size) / 2)
        padded = sum(len(np.unique(t)) < self.n_targets for t in self.targets)
        log.info("ctfm: %d anchors, field %d px of the %d px crops (x%.3g), %d target cells each; %d fields "
                 "hold fewer cells (padded by repetition)", len(own), self.field_px, self.context_size,
                 self.context_scale, self.n_targets, padded)

    def __len__(self) -> int:
        return len(self.own)

    def image(self, i: int) -> np.ndarray:
        return self.own.image(i)

    def field(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Anchor ``i``'s context field (field_px, field_px, 3) uint8 and its target crops (K, s, s, 3)."""
        from ..crops.extract import window_origin

        masked = getattr(self.context, "variant", "images") == "masked"
        centre = self._c_xy[self.anchor_context[i]]
        origin = window_origin(centre, self.field_px)
        tiles = self.tiles[i][::-1]  # farthest first: the anchor's own crop is pasted last
        tile_origins = window_origin(self._c_xy[tiles], self.context_size) if len(tiles) else np.empty((0, 2))
        if not masked:
            tiles, tile_origins = _covering(tiles, tile_origins, origin, self.field_px, self.context_size)
        context = paste_field([self.context.image(int(t)) for t in tiles], tile_origins, origin, self.field_px,
                              masked=masked)
        targets = np.stack([self.target.image(int(t)) for t in self.targets[i]])
        return context, targets

    def __getitem__(self, i: int):
        from PIL import Image

        context, targets = self.field(i)
        ctx, tgts = Image.fromarray(context), [Image.fromarray(t) for t in targets]
        views = [t(ctx) for t in self.views] + [torch.stack([t(x) for x in tgts]) for t in self.views]
        return views, torch.tensor(self.own._dist[i], dtype=torch.float32), int(self.own._labels[i])


def _covering(tiles: np.ndarray, origins: np.ndarray, field_origin, field: int, size: int):
    """The tiles (nearest last, as given reversed) that add uncovered pixels when pasted nearest-first:
    with ``images`` crops overlapping tiles carry the same pixels, so the others need not be read."""
    covered = np.zeros((field, field), bool)
    keep = []
    for j in range(len(tiles) - 1, -1, -1):  # nearest first
        x0, y0 = int(origins[j][0] - field_origin[0]), int(origins[j][1] - field_origin[1])
        sl = (slice(max(y0, 0), max(min(y0 + size, field), 0)), slice(max(x0, 0), max(min(x0 + size, field), 0)))
        if covered[sl].size and not covered[sl].all():
            covered[sl] = True
            keep.append(j)
    keep = np.asarray(sorted(keep), dtype=np.int64)
    return tiles[keep], (origins[keep] if len(keep) else np.empty((0, 2), np.int64))


# --------------------------------------------------------------------------- the module
def jigsaw(batch: int, k: int, mask_ratio: float = MASK_RATIO, *,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One masked jigsaw per sample (seed 004 §III-D: "target features were shuffled and randomly
    masked out with a predefined ratio", 0.5 in §IV-B): a permutation (B, K; slot j holds target
    ``perm[b, j]``) and a mask over the slots (B, K; True = zeroed, exactly ``round(mask_ratio * K)``)."""
    perm = torch.rand(batch, k, generator=generator).argsort(dim=1)
    slots = torch.rand(batch, k, generator=generator).argsort(dim=1)[:, :int(round(float(mask_ratio) * k))]
    return perm, torch.zeros(batch, k, dtype=torch.bool).scatter_(1, slots, True)


def apply_jigsaw(targets: torch.Tensor, perm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``targets`` (B, K, d) shuffled by ``perm`` and masked (zeroed) by ``mask`` (:func:`jigsaw`)."""
    perm, mask = perm.to(targets.device), mask.to(targets.device)
    shuffled = torch.gather(targets, 1, perm[..., None].expand_as(targets))
    return shuffled.masked_fill(mask[..., None], 0.0)


def masked_jigsaw(targets: torch.Tensor, mask_ratio: float = MASK_RATIO, *,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`jigsaw` drawn for ``targets`` (B, K, d) and applied: (processed targets, perm, mask)."""
    perm, mask = jigsaw(targets.shape[0], targets.shape[1], mask_ratio, generator=generator)
    return apply_jigsaw(targets, perm, mask), perm, mask


def stage_features(backbone: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """Pooled features of each stage (B, d_i), the last the backbone's pooled output (as
    :meth:`cellstage.ssl.simsiam.SimSiam.stage_features`)."""
    if len(indices) == 1:
        return [backbone(x)]
    final, inter = backbone.forward_intermediates(x, indices=indices)
    return [f.mean(dim=(2, 3)) for f in inter[:-1]] + [backbone.forward_head(final, pre_logits=True)]


class CTFM(SSLModule):
    """Dual-branch SimSiam with context-target fusion (see the module docstring)."""

    default_lr = 1e-3  # seed 004 Table I
    default_stage_weights: tuple[float, ...] = (0.1, 0.4, 0.7, 1.0)  # seed 004 §IV-B (DSL)

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None, export: str = "target",
                 mask_ratio: float = MASK_RATIO, n_targets: int = N_TARGETS, context_scale: float = CONTEXT_SCALE,
                 stage_weights: Sequence[float] | None = None, predictor_ratio: float = 0.25) -> None:
        super().__init__(lr=lr)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        from ..training.backbones import create_backbone
        from .simsiam import stage_indices

        if export not in EXPORTS:
            raise CellstageError(f"pretrain.methods.ctfm.export: {export!r} is not one of {list(EXPORTS)}")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise CellstageError(f"pretrain.methods.ctfm.mask_ratio: must be in [0, 1), got {mask_ratio}")
        if int(n_targets) < 1:
            raise CellstageError(f"pretrain.methods.ctfm.n_targets: must be >= 1, got {n_targets}")
        weights = [float(w) for w in (stage_weights if stage_weights is not None else self.default_stage_weights)]
        if not weights:
            raise CellstageError("pretrain.methods.ctfm.stage_weights: empty")
        self.save_hyperparameters()
        self.export, self.mask_ratio, self.n_targets = export, float(mask_ratio), int(n_targets)
        self.context_scale, self.stage_weights = float(context_scale), weights
        # two backbones of the same architecture, weights not shared (seed 004 §III-D)
        self.backbones = nn.ModuleDict({b: create_backbone(backbone, img_size=img_size) for b in EXPORTS[::-1]})
        self.stage_indices = stage_indices(self.backbones["target"], len(weights), is_vit(backbone))
        with torch.no_grad():
            dims = [int(f.shape[1]) for f in stage_features(self.backbones["target"],
                                                            torch.zeros(2, 3, img_size, img_size), self.stage_indices)]
        widths = {"context": dims, "target": dims, "fusion": [d * (1 + self.n_targets) for d in dims]}
        self.projectors = nn.ModuleDict({t: nn.ModuleList(SimSiamProjectionHead(d, d, d) for d in widths[t])
                                         for t in BRANCHES})
        self.predictors = nn.ModuleDict({
            t: nn.ModuleList(SimSiamPredictionHead(d, max(1, int(d * predictor_ratio)), d) for d in widths[t])
            for t in BRANCHES})
        self.criterion = NegativeCosineSimilarity()

    @property
    def backbone_model(self) -> nn.Module:
        """The exported backbone: the 40x cell (target) or the 20x field (context) branch."""
        return self.backbones[self.export]

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Everything but the exported backbone: the other branch, projectors and predictors."""
        skip = f"backbones.{self.export}."
        return {k: v for k, v in self.exported_state().items() if not k.startswith(skip)}

    def forward(self, x):
        return self.backbone_model(x)

    def view_features(self, context: torch.Tensor, targets: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per task, the stage features of one view: context (B, d_i), target (B, d_i: every target crop
        of the batch, B*K rows) and fusion (B, (1+K) d_i: the context feature and the shuffled, masked
        target features, one jigsaw per sample shared by the stages)."""
        b, k = targets.shape[:2]
        if k != self.n_targets:
            raise CellstageError(f"ctfm: {k} target crops per field, the fusion heads expect {self.n_targets}")
        ctx = stage_features(self.backbones["context"], context, self.stage_indices)
        tgt = stage_features(self.backbones["target"], targets.flatten(0, 1), self.stage_indices)
        perm, mask = jigsaw(b, k, self.mask_ratio)  # the torch RNG: seeded per epoch by the trainer
        fusion = [torch.cat([c, apply_jigsaw(t.view(b, k, -1), perm, mask).flatten(1)], dim=1)
                  for c, t in zip(ctx, tgt)]
        return {"context": ctx, "target": tgt, "fusion": fusion}

    def task_loss(self, task: str, k1: list[torch.Tensor], k2: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 6-7 for one task: sum_i w_i (½ D(p1, sg(z2)) + ½ D(p2, sg(z1))) over the stages."""
        loss = 0.0
        for i, (w, a, b) in enumerate(zip(self.stage_weights, k1, k2)):
            z1, z2 = self.projectors[task][i](a), self.projectors[task][i](b)
            p1, p2 = self.predictors[task][i](z1), self.predictors[task][i](z2)
            loss = loss + w * 0.5 * (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach()))
        return loss

    def ssl_loss(self, batch):
        (c1, c2, t1, t2), _, _ = batch
        f1, f2 = self.view_features(c1, t1), self.view_features(c2, t2)
        # Eq. 8: L = L_DSL,c + L_DSL,t + L_DSL,fu
        loss = sum(self.task_loss(task, f1[task], f2[task]) for task in BRANCHES)
        return loss, c1.shape[0]

    def configure_optimizers(self):
        # seed 004 Table I: Adam, lr 1e-3, no schedule stated (constant)
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def paired_dataset(own, partner, positions, transform, method_kwargs: dict | None = None) -> ContextTargetDataset:
    """The pretraining dataset of ``ctfm`` (``MethodSpec.paired_dataset``): the field settings of
    the run's ``pretrain.methods.ctfm`` block (``n_targets``, ``context_scale``)."""
    kw = {k: v for k, v in (method_kwargs or {}).items() if k in ("n_targets", "context_scale")}
    return ContextTargetDataset(own, partner, positions, transform, **kw)
