"""SimSiam and dense SimSiam (seed 004, Wang et al., DSF-WSI) on a timm backbone with lightly's
heads and loss.

Seed 004 §III-C (Eq. 1–2): two views x1, x2 of a crop go through the shared encoder f, a
projector g and a predictor h; ``D(p, z)`` is the negative cosine similarity and the loss is
``½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1))`` (lightly ``NegativeCosineSimilarity``).

Dense SimSiam learning (DSL), seed 004 §III-E (Eq. 6–7) and §IV-B: every backbone stage s^i
(ResNet-18: layer1..layer4) has its own projector and predictor; the stage feature map is
global-average pooled, the per-stage SimSiam loss L^{s^i} (Eq. 6) is weighted and summed,
``L_DSL = Σ_i w_i · L^{s^i}`` (Eq. 7), with w = {0.1, 0.4, 0.7, 1.0} (§IV-B). Projector: a
three-layer MLP whose hidden and output dimensions equal the input (stage) dimension
(lightly ``SimSiamProjectionHead(d, d, d)``); predictor: a two-layer MLP with input = output
dimension and a hidden dimension of a quarter of it (``SimSiamPredictionHead(d, d // 4, d)``).
Plain SimSiam is the same module with one stage (the backbone's pooled output) of weight 1.

Stages come from timm's ``forward_intermediates``: for a CNN the last ``len(stage_weights)``
entries of ``feature_info`` (ResNet: layer1..layer4); for a ViT, which has no stages, blocks
evenly spaced through the depth (vit_tiny, 12 blocks: 3, 6, 9, 12). The last stage is always the
backbone's own pooled output (``forward_head(pre_logits=True)``), the representation that
fine-tuning uses (for a ResNet identical to pooling layer4).

Optimiser (seed 004 Table I, pre-training): Adam, learning rate 1e-3, batch size 32, 500 (BCSS) /
300 (PAIP2019) epochs; no schedule is stated, so the learning rate is constant. Views: lightly
``SimSiamTransform`` (the SimSiam paper's augmentations, "default data transformation settings
from SimSiam", §IV-B) with ``input_size`` = crop size. The dual-branch context/target part of
seed 004 (CTFM, masked jigsaw, Eq. 3–5, 8) is not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..utils import CellstageError
from .base import SSLModule, is_vit


def make_transform(img_size: int, **overrides):
    from lightly.transforms import SimSiamTransform

    return SimSiamTransform(input_size=img_size, **overrides)


def stage_indices(backbone: nn.Module, n_stages: int, vit: bool) -> list[int]:
    """``forward_intermediates`` indices of the ``n_stages`` stages (see the module docstring)."""
    if vit:
        depth = len(backbone.blocks)
        if n_stages > depth:
            raise CellstageError(f"dense simsiam: {n_stages} stages asked, the ViT has {depth} blocks")
        return [round(depth * (i + 1) / n_stages) - 1 for i in range(n_stages)]
    n_feat = len(backbone.feature_info)
    if n_stages > n_feat:
        raise CellstageError(f"dense simsiam: {n_stages} stages asked, the backbone has {n_feat}")
    return list(range(n_feat - n_stages, n_feat))


class SimSiam(SSLModule):
    """SimSiam over the stages weighted by ``stage_weights`` (one weight: plain SimSiam)."""

    default_lr = 1e-3  # seed 004 Table I
    default_stage_weights: tuple[float, ...] = (1.0,)

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None,
                 stage_weights: Sequence[float] | None = None, predictor_ratio: float = 0.25) -> None:
        super().__init__(lr=lr)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        from ..training.backbones import create_backbone

        weights = [float(w) for w in (stage_weights if stage_weights is not None else self.default_stage_weights)]
        if not weights:
            raise CellstageError("simsiam: stage_weights is empty")
        self.save_hyperparameters()
        self.backbone_model = create_backbone(backbone, img_size=img_size)
        self.stage_weights = weights
        self.stage_indices = stage_indices(self.backbone_model, len(weights), is_vit(backbone))
        with torch.no_grad():  # stage widths from one dummy forward
            dims = [int(f.shape[1]) for f in self.stage_features(torch.zeros(2, 3, img_size, img_size))]
        self.projectors = nn.ModuleList(SimSiamProjectionHead(d, d, d) for d in dims)
        self.predictors = nn.ModuleList(
            SimSiamPredictionHead(d, max(1, int(d * predictor_ratio)), d) for d in dims
        )
        self.criterion = NegativeCosineSimilarity()

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled features of each stage, (B, d_i); the last is the backbone's pooled output."""
        bb = self.backbone_model
        if len(self.stage_weights) == 1:
            return [bb(x)]
        final, inter = bb.forward_intermediates(x, indices=self.stage_indices)
        return [f.mean(dim=(2, 3)) for f in inter[:-1]] + [bb.forward_head(final, pre_logits=True)]

    def forward(self, x):
        return self.backbone_model(x)

    def stage_loss(self, i: int, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """Eq. 6: ½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1)) of stage ``i``."""
        z1, z2 = self.projectors[i](k1), self.projectors[i](k2)
        p1, p2 = self.predictors[i](z1), self.predictors[i](z2)
        return 0.5 * (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach()))

    def ssl_loss(self, batch):
        (x0, x1), _, _ = batch
        k0, k1 = self.stage_features(x0), self.stage_features(x1)
        # Eq. 7: L_DSL = sum_i w_i L^{s^i}
        loss = sum(w * self.stage_loss(i, a, b) for i, (w, a, b) in enumerate(zip(self.stage_weights, k0, k1)))
        return loss, x0.shape[0]

    def configure_optimizers(self):
        # seed 004 Table I: Adam, lr 1e-3, no schedule stated (constant)
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class DenseSimSiam(SimSiam):
    """Dense SimSiam learning, seed 004 §III-E: four stages weighted 0.1 / 0.4 / 0.7 / 1.0 (§IV-B)."""

    default_stage_weights = (0.1, 0.4, 0.7, 1.0)
