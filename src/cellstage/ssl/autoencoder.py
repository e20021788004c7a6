"""Autoencoder pretraining (seed 002, "Pathology Image Representation Learning"): an encoder–decoder
on a timm backbone trained to reconstruct its input; the encoder is exported for fine-tuning.

Seed 002 §"Pathology Image Representation Learning":
- encoder: ResNet-34 in the paper; here any timm backbone (``create_backbone``), its last feature
  map taken through ``forward_intermediates`` (a ViT's last block as a (D, H/p, W/p) map);
- decoder: "the downsampling layers in Resnet34 replaced with upsampling layers" — here a stack
  of stages, each a ×2 nearest upsampling, a 3×3 conv–BN–ReLU that halves the width (from the
  encoder's width down to ``min_decoder_width``) and ``decoder_blocks`` residual 3×3 blocks
  (ResNet basic blocks), until the crop size is reached (bilinear resize to the exact size), then
  a 1×1 conv to 3 channels. The paper mirrors ResNet-34 block for block ([3, 6, 4, 3] blocks);
  the default of 1 block per stage is a lighter decoder (documented deviation), set
  ``decoder_blocks`` for more;
- loss: L1, the mean absolute pixel error between input and reconstruction (Eq. 1), on the
  normalised input tensor (ImageNet mean/std, as the other methods' views);
- optimiser: Adam, learning rate 1e-4, ×0.1 at epochs 110 and 160 of 200 ("reduced by a factor
  of 0.1 at the 110th and 160th epochs"). The milestones are absolute epochs: a run shorter than
  110 epochs keeps 1e-4 throughout (the paper's 200 epochs are ``pretrain.epochs: 200``). The
  ``MultiStepLR`` is stepped by the module after every epoch and kept in the checkpoint
  (:class:`cellstage.training.resume.CheckpointedMultiStep`), so a resumed run decays exactly when
  an uninterrupted one does.
- views: the crop with random horizontal/vertical flips (the paper states no augmentation;
  flips keep the reconstruction task unchanged and match the project's histology views).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..training.resume import CheckpointedMultiStep
from .base import SSLModule


class OneView:
    """A transform whose result is a one-view list, as lightly's ``MAETransform`` (picklable)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image)]


def make_transform(img_size: int, *, hf_prob: float = 0.5, vf_prob: float = 0.5):
    """One view per crop: flips, [0, 1], ImageNet normalisation."""
    from torchvision.transforms import v2

    from ..training.transforms import IMAGENET_MEAN, IMAGENET_STD

    return OneView(v2.Compose([
        v2.Resize((img_size, img_size), antialias=True),
        v2.RandomHorizontalFlip(hf_prob),
        v2.RandomVerticalFlip(vf_prob),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ]))


class _ResidualBlock(nn.Module):
    """ResNet basic block at constant width (no downsampling)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


class Decoder(nn.Module):
    """Upsampling decoder: feature map (C, h, w) -> image (3, img_size, img_size)."""

    def __init__(self, in_width: int, in_size: int, img_size: int, *, blocks: int = 1, min_width: int = 16) -> None:
        super().__init__()
        n_up = max(0, math.ceil(math.log2(img_size / in_size)))
        stages, width = [], in_width
        for _ in range(n_up):
            out = max(min_width, width // 2)
            stages += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                *(_ResidualBlock(out) for _ in range(blocks)),
            ]
            width = out
        self.stages = nn.Sequential(*stages)
        self.to_image = nn.Conv2d(width, 3, 1)
        self.img_size = int(img_size)

    def forward(self, x):
        x = self.stages(x)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                          align_corners=False)
        return self.to_image(x)


class Autoencoder(SSLModule):
    default_lr = 1e-4  # seed 002

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None,
                 lr_milestones: tuple[int, ...] | list[int] = (110, 160), lr_gamma: float = 0.1,
                 decoder_blocks: int = 1, min_decoder_width: int = 16) -> None:
        super().__init__(lr=lr)
        from ..training.backbones import create_backbone

        self.save_hyperparameters()
        self.backbone_model = create_backbone(backbone, img_size=img_size)
        self.lr_milestones = [int(m) for m in lr_milestones]
        self.lr_gamma = float(lr_gamma)
        self.lr_schedule = CheckpointedMultiStep()
        with torch.no_grad():
            fmap = self.encode(torch.zeros(2, 3, img_size, img_size))
        self.decoder = Decoder(int(fmap.shape[1]), int(fmap.shape[-1]), img_size, blocks=int(decoder_blocks),
                               min_width=int(min_decoder_width))
        self.criterion = nn.L1Loss()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, (B, C, h, w)."""
        return self.backbone_model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]

    def forward(self, x):
        return self.decoder(self.encode(x))

    def ssl_loss(self, batch):
        views, _, _ = batch
        x = views[0]
        return self.criterion(self(x), x), x.shape[0]  # Eq. 1

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        self.lr_schedule.attach(opt, milestones=self.lr_milestones, gamma=self.lr_gamma)
        return opt
