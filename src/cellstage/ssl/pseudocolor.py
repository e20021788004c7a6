"""Pseudo-colourising masked cells (seed 001, Wagner & Rohr, "Self-supervised pseudo-colorizing of
masked cells"): an encoder–decoder on a timm backbone reads the grey crop with padded patches set
to zero and predicts the crop's intensity mapped through a colormap; the encoder is exported for
fine-tuning.

Seed 001 §3.1, the objective:

- target: "a new form of autoencoding by training to reconstruct pseudo-colored versions of input
  images", with "colormaps provided by the matplotlib library". The four colormaps of §3.1 and
  Table 1 are the choices (``colormap``): ``nipy_spectral`` (the default, "pseudo-spectral ...
  higher color variance for low intensity levels", best in Tables 1–2), ``rainbow``, ``viridis``,
  ``seismic``. The colormap becomes a (N, 3) lookup table once (a buffer, so it sits on the
  training device) and the crop's intensity v in [0, 1] picks entry ``floor(v · N)`` (clipped to
  N − 1): matplotlib's own rule for a float, so the target of v is exactly ``cmap(v)[:3]``;
- intensity: the crop's luminance 0.299 R + 0.587 G + 0.114 B (the weights of §3.1 Eq. 1), in
  [0, 1]. The paper's fluorescence images are grey; these crops are RGB histology, so the grey
  crop is the input and the colours of the stain are not seen in pretraining. Not done: the
  median filter (kernel 3) and per-image min–max scaling of §4.1's pre-processing (a crop is
  already in [0, 1], white background; a per-crop scaling would leave a uniform crop undefined);
- padded masking (§3.1, Fig. 1b): patches of "12×12 pixels for an image size of 384×384 pixels",
  "padded with a padding size of 1/4 of the patch width", each "masked out randomly with a
  probability of 50% using a discrete uniform distribution U{0, 1}" (``mask_prob``), masked areas
  "set to zero"; "the overall mean masking ratio becomes 33.3%". Geometry here: a grid of square
  patches separated by unmasked bands of ``mask_padding`` (¼) of the patch width, starting with a
  band at the top-left and cut at the far edges; the patch width is 12 px scaled by crop/384 and
  at least 4 px (``MIN_PATCH``), so the ¼ band is a whole pixel (40 and 80 px crops: 4 px patches,
  1 px bands). The mean ratio is ``mask_prob · (patch / (patch + band))²`` = 0.5 · 0.8² = 32% — the
  paper's 33.3%. (The authors' code, cell-centroid-former ``padded_masking.py``, pads every side of
  a patch by ¼, i.e. bands of ½ patch, whose 2-D ratio is 0.5 · (12/18)² = 22%; 33.3% is that
  geometry's 1-D ratio 0.5 · 12/18. ``mask_padding: 0.5`` reproduces the code.) ``mask_prob: 0`` is
  the "without masking" rows of Table 1. Masks are drawn on the device for each batch from the
  torch RNG;
- the input: the masked grey crop repeated on 3 channels and normalised with the ImageNet mean/std
  (as the other methods' views), so the exported backbone takes 3-channel input as fine-tuning
  gives it (the paper's ContextBlock, §3.2.1, also turns a 2-D image into 3 channels);
- model: the paper pretrains its CellCentroidFormer (EfficientNetV2-S, MobileViT neck,
  upsampling heads, §3.2); here any timm backbone (its last feature map through
  ``forward_intermediates``) and the light upsampling decoder of
  :class:`cellstage.ssl.autoencoder.Decoder` with 3 output channels;
- loss (§4.2 "Experimental setup"): "the pixel-wise mean squared error (MSE)" over all pixels,
  masked and not;
- optimiser (§4.2): "Adam ... with its standard configuration", "initial learning rate ... 1^{-4},
  and reduced on plateaus by a factor of 10 to a minimum learning rate of 1^{-6}" (``lr_factor``
  0.1, ``min_lr`` 1e-6; the patience is not stated: 10 epochs, the project's and Keras' default),
  stepped on the validation loss (:class:`~cellstage.ssl.base.SSLModule`);
- epochs: "pre-trained for 75 epochs" (§4.2, §4.3) = ``pretrain.epochs: 75`` or
  ``pretrain.methods.pseudocolor.epochs: 75``; the demo keeps ``pretrain.epochs``;
- views (§4.3): "geometric data augmentations on-the-fly such as flip, rotation, and crop"; the
  authors' code: random flip, a random crop of 0.9 × the size, a rotation of up to ±0.2 turns (72°,
  reflected fill) and a resize back (:func:`make_transform`). Target and input come from the same
  augmented crop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..utils import CellstageError
from .autoencoder import Decoder, OneView
from .base import SSLModule

#: seed 001 §3.1 and Table 1
COLORMAPS = ("nipy_spectral", "rainbow", "viridis", "seismic")
PAPER_IMG_SIZE = 384
PAPER_PATCH = 12  # px at 384 px
MIN_PATCH = 4  # smallest patch whose ¼ band is a whole pixel

_KEY = "pretrain.methods.pseudocolor"


def make_transform(
    img_size: int, *, hf_prob: float = 0.5, vf_prob: float = 0.5, crop_scale: float = 0.9, degrees: float = 72.0
):
    """One view per crop in [0, 1] (not normalised: the module derives input and target from it):
    flips, a random square crop of ``crop_scale`` × the size, a rotation within ±``degrees``
    (reflect-padded first, so no empty corners), resized back to ``img_size``."""
    from torchvision.transforms import v2

    if not 0 < crop_scale <= 1:
        raise CellstageError(f"config {_KEY}.views.crop_scale: must be in (0, 1], got {crop_scale}")
    crop = max(1, round(crop_scale * img_size))
    steps = [
        v2.Resize((img_size, img_size), antialias=True),
        v2.RandomHorizontalFlip(hf_prob),
        v2.RandomVerticalFlip(vf_prob),
        v2.RandomCrop(crop),
    ]
    if degrees:
        pad = math.ceil(crop * (math.sqrt(2) - 1) / 2)  # covers the corners of any rotation
        steps += [
            v2.Pad(pad, padding_mode="reflect"),
            v2.RandomRotation(degrees, interpolation=v2.InterpolationMode.BILINEAR),
            v2.CenterCrop(crop),
        ]
    steps += [v2.Resize((img_size, img_size), antialias=True), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return OneView(v2.Compose(steps))


# ----------------------------------------------------------------------------- target
def colormap_lut(name: str) -> torch.Tensor:
    """(N, 3) float32 RGB entries of a matplotlib colormap (one of :data:`COLORMAPS`)."""
    if name not in COLORMAPS:
        raise CellstageError(
            f"config {_KEY}.colormap: unknown colormap {name!r}; choose one of "
            f"{list(COLORMAPS)} (seed 001 §3.1; nipy_spectral is the paper's best)"
        )
    from matplotlib import colormaps

    cmap = colormaps[name]
    return torch.as_tensor(cmap(np.arange(cmap.N))[:, :3], dtype=torch.float32)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) intensity (seed 001 Eq. 1 weights)."""
    w = rgb.new_tensor([0.299, 0.587, 0.114])
    return torch.einsum("bchw,c->bhw", rgb, w)


def pseudocolor(intensity: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(B, H, W) intensity in [0, 1] -> (B, 3, H, W) colours: matplotlib's rule for floats."""
    n = lut.shape[0]
    idx = (intensity * n).long().clamp_(0, n - 1)
    return lut[idx].permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- masking
def mask_geometry(img_size: int, patch: int | None = None, padding: float = 0.25) -> tuple[int, int]:
    """(patch, band) in px: 12 px at 384 px scaled to ``img_size`` (at least ``MIN_PATCH``) unless
    ``patch`` is given; the band between patches is ``padding`` × patch, at least 1 px."""
    if patch is None:
        patch = max(MIN_PATCH, round(PAPER_PATCH * img_size / PAPER_IMG_SIZE))
    if int(patch) < 1:
        raise CellstageError(f"config {_KEY}.mask_patch: must be >= 1 px (null: scaled), got {patch}")
    if padding < 0:
        raise CellstageError(f"config {_KEY}.mask_padding: must be >= 0, got {padding}")
    band = max(1, round(int(patch) * padding)) if padding > 0 else 0
    return int(patch), int(band)


def _axis(size: int, patch: int, band: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel of one axis: its grid cell and whether it lies in the cell's patch (not its band)."""
    pos = torch.arange(size, device=device)
    period = patch + band
    return pos // period, (pos % period) >= band


def padded_mask(
    batch: int,
    height: int,
    width: int,
    patch: int,
    band: int,
    prob: float,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, H, W) bool, True = masked: each patch of the grid is masked with probability ``prob``."""
    rows, in_rows = _axis(height, patch, band, device)
    cols, in_cols = _axis(width, patch, band, device)
    draws = torch.rand(batch, int(rows[-1]) + 1, int(cols[-1]) + 1, device=device, generator=generator) < prob
    return draws[:, rows[:, None], cols[None, :]] & (in_rows[:, None] & in_cols[None, :])


def expected_mask_ratio(height: int, width: int, patch: int, band: int, prob: float) -> float:
    """Mean fraction of masked pixels: ``prob`` × the fraction of pixels inside patches."""
    _, in_rows = _axis(height, patch, band)
    _, in_cols = _axis(width, patch, band)
    return float(prob) * float(in_rows.float().mean()) * float(in_cols.float().mean())


# ----------------------------------------------------------------------------- the method
class PseudoColor(SSLModule):
    default_lr = 1e-4  # seed 001 §4.2

    def __init__(
        self,
        backbone: str,
        img_size: int,
        *,
        lr: float | None = None,
        colormap: str = "nipy_spectral",
        mask_patch: int | None = None,
        mask_padding: float = 0.25,
        mask_prob: float = 0.5,
        lr_factor: float = 0.1,
        lr_patience: int = 10,
        min_lr: float = 1e-6,
        decoder_blocks: int = 1,
        min_decoder_width: int = 16,
    ) -> None:
        super().__init__(lr=lr, weight_decay=0.0, lr_factor=lr_factor, lr_patience=lr_patience)
        from ..training.backbones import create_backbone
        from ..training.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.save_hyperparameters()
        if not 0 <= mask_prob <= 1:
            raise CellstageError(f"config {_KEY}.mask_prob: must be in [0, 1], got {mask_prob}")
        self.register_buffer("lut", colormap_lut(colormap), persistent=False)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.mask_patch, self.mask_band = mask_geometry(img_size, mask_patch, float(mask_padding))
        self.mask_prob = float(mask_prob)
        self.min_lr = float(min_lr)
        self.backbone_model = create_backbone(backbone, img_size=img_size)
        with torch.no_grad():
            fmap = self.encode(torch.zeros(2, 3, img_size, img_size))
        self.decoder = Decoder(
            int(fmap.shape[1]),
            int(fmap.shape[-1]),
            img_size,
            blocks=int(decoder_blocks),
            min_width=int(min_decoder_width),
        )
        self.criterion = nn.MSELoss()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, (B, C, h, w)."""
        return self.backbone_model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]

    def forward(self, x):
        return self.decoder(self.encode(x))

    def inputs_and_targets(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From views in [0, 1]: the normalised masked grey input (B, 3, H, W), the pseudo-coloured
        target (B, 3, H, W) and the mask (B, H, W)."""
        grey = luminance(rgb)
        target = pseudocolor(grey, self.lut)
        b, h, w = grey.shape
        mask = padded_mask(b, h, w, self.mask_patch, self.mask_band, self.mask_prob, device=grey.device)
        x = grey.masked_fill(mask, 0.0).unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self.input_mean) / self.input_std, target, mask

    def ssl_loss(self, batch):
        views, _, _ = batch
        x, target, _ = self.inputs_and_targets(views[0])
        return self.criterion(self(x), target), x.shape[0]

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        self.lr_schedule.attach(opt, mode="min", factor=self.lr_factor, patience=self.lr_patience, min_lr=self.min_lr)
        return opt
