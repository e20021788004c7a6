"""SimCLR (Chen et al. 2020) with a timm backbone, lightly's projection head and NT-Xent loss.

Defaults (seed 000 gives the learning rate 1e-3 and AdamW; the rest is SimCLR/lightly):
- projection head 2 layers, hidden = feature dim, output 128 (SimCLR paper, lightly default);
- NT-Xent temperature 0.5 (lightly's default and SimCLR's CIFAR-10 setting; the paper's 0.1 is
  for batches of 4096);
- views: lightly ``SimCLRTransform`` with ``input_size`` = crop size, ``min_scale`` 0.25 (0.08 of
  an 80 px crop is ~23 px, less than a nucleus), colour jitter strength 0.5 (lightly's advice for
  small images), horizontal + vertical flips and 90° rotations (histology has no orientation,
  seed 000 also flips/rotates when fine-tuning); everything else lightly's default.
"""

from __future__ import annotations

from .base import SSLModule

TRANSFORM_DEFAULTS = dict(min_scale=0.25, cj_strength=0.5, hf_prob=0.5, vf_prob=0.5, rr_prob=0.5)


def make_transform(img_size: int, **overrides):
    from lightly.transforms import SimCLRTransform

    kw = {**TRANSFORM_DEFAULTS, **overrides}
    return SimCLRTransform(input_size=img_size, **kw)


class SimCLR(SSLModule):
    default_lr = 1e-3

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None, output_dim: int = 128,
                 temperature: float = 0.5, **kw) -> None:
        super().__init__(lr=lr, **kw)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        from ..training.backbones import create_backbone, feature_dim

        self.save_hyperparameters()
        self.backbone_model = create_backbone(backbone, img_size=img_size)
        dim = feature_dim(self.backbone_model)
        self.projection_head = SimCLRProjectionHead(dim, dim, output_dim)
        self.criterion = NTXentLoss(temperature=temperature)

    def forward(self, x):
        return self.projection_head(self.backbone_model(x))

    def ssl_loss(self, batch):
        (x0, x1), _, _ = batch
        return self.criterion(self(x0), self(x1)), x0.shape[0]
