"""Backbones and the MIL head of seed 003.

Seed 003 §2: "we evaluated two alternatives of multi instance learning, namely with and without
an attention mechanism. For the attention-based approach, each representation is passed through a
Multilayer Perceptron (MLP). The MLP consists of two dense layers with 2048 and 1 neuron
respectively. The first layer uses ReLU and the second layer uses a Sigmoid activation function.
As a consequence, the output of the MLP is a scalar that is multiplied by the corresponding image
representation of the used backbone, effectively weighing its importance and therefore providing
attention to the different samples. In the non attention-based approach no additional weighting
is used. Finally, all (weighted or non-weighted) representations are passed through a global
average pooling layer and a last dense layer to provide the respective classification result."

Backbones (timm, random init; :data:`BACKBONES`): ``resnet18``, ``resnet50`` (Level One,
fold 5 only in the paper), ``inception_v3`` and ``resnet18_mod``, seed 003's "modified version of
ResNet18" (§2.1: "the first 7×7 convolution is replaced by a 3×3 convolution and an additional
residual block with a projection shortcut is used instead of the first max-pooling"), built from a
timm ``resnet18`` (:func:`modified_resnet18`). The paper gives no strides; we keep the overall
downsampling of the stem at /2 instead of /4: the 3×3 convolution has stride 1 and the new
residual block stride 2 (as the max-pooling it replaces), so an 80 px crop reaches ``layer4`` at
5×5 instead of 3×3.

Attention pooling (``pooling``, config ``aml.mil.attention_pooling``): ``mean`` is the paper's
reading above, ``mean_k(w_k h_k)``. ``normalized`` divides by the weights instead,
``sum_k(w_k h_k) / sum_k(w_k)`` (not in seed 003): the sigmoid can then only re-weight the
instances, not rescale the whole bag. With ``mean``, scaling the bag by ``w`` is the quickest way
to change the logits, and the sigmoid saturates. On the smear demo (NPM1, Level Three without
background, 8 epochs, lr 10⁻³) the ``mean`` model collapsed in each of folds 0–2: it gave every
slide the same P(mut) = 0.49 (accuracy 0.5), with and without precise BatchNorm (fold 0, and a
last-layer bias started at +3, sigmoid 0.95). With ``normalized`` and precise BatchNorm the same
folds reached 0.75 each.

InceptionV3 needs inputs of at least :data:`INCEPTION_MIN_PX` = 75 px (its stem reduces smaller
images to nothing); :func:`input_size` resizes smaller crops up to 75 px (bilinear).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import CellstageError

log = logging.getLogger("cellstage.mil")

BACKBONES = ("resnet18", "resnet18_mod", "resnet50", "inception_v3")
INCEPTION_MIN_PX = 75
ATTENTION_HIDDEN = 2048  # §2: "two dense layers with 2048 and 1 neuron"
POOLINGS = ("mean", "normalized")
# the paper's names of the models (Tables 3-8 column headers)
PAPER_NAMES = {
    ("resnet18", False): "ResNet18",
    ("resnet50", False): "ResNet50",
    ("resnet18_mod", False): "modified ResNet18",
    ("resnet18_mod", True): "modified ResNet18 Attention based",
    ("inception_v3", False): "InceptionV3",
}


def paper_name(backbone: str, attention: bool) -> str:
    return PAPER_NAMES.get((backbone, bool(attention)),
                           f"{backbone}{' Attention based' if attention else ''}")


def input_size(backbone: str, crop_px: int, img_size: int | None) -> int:
    """The side the backbone sees: ``img_size`` (None = the crop's), raised to 75 px for InceptionV3."""
    size = int(img_size or crop_px)
    if backbone == "inception_v3" and size < INCEPTION_MIN_PX:
        log.warning("inception_v3 needs >= %d px inputs: resizing %d px crops to %d px",
                    INCEPTION_MIN_PX, size, INCEPTION_MIN_PX)
        size = INCEPTION_MIN_PX
    return size


def modified_resnet18() -> nn.Module:
    """timm ``resnet18`` (no classifier) with a 3×3 stride-1 first convolution and, in place of the
    max-pooling, a BasicBlock of stride 2 with a projection shortcut (1×1 conv stride 2 + BN)."""
    import timm
    from timm.models.resnet import BasicBlock

    m = timm.create_model("resnet18", pretrained=False, num_classes=0)
    width = m.conv1.out_channels
    m.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    projection = nn.Sequential(nn.Conv2d(width, width, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(width))
    m.maxpool = BasicBlock(width, width, stride=2, downsample=projection)
    return m


def create_mil_backbone(name: str) -> nn.Module:
    """A timm backbone returning pooled features (``num_features`` wide)."""
    from ..training.backbones import create_backbone

    if name not in BACKBONES:
        raise CellstageError(f"MIL backbone {name!r} is not one of {list(BACKBONES)} (config mil.backbones)")
    if name == "resnet18_mod":
        return modified_resnet18()
    return create_backbone(name)


class MILNet(nn.Module):
    """Backbone per instance → optional attention scalar × representation → mean over the bag's
    instances (global average pooling) → dense layer → class logits.

    ``forward(x)``: ``x`` (B, K, 3, H, W) → logits (B, n_classes); ``size``: inputs are resized
    to ``size`` px when they differ (bilinear); ``pooling``: ``mean`` or ``normalized`` (module
    docstring; only with attention).
    """

    def __init__(self, backbone: str, n_classes: int, attention: bool, size: int | None = None,
                 pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise CellstageError(f"MIL attention pooling {pooling!r} is not one of {list(POOLINGS)} "
                                 "(config aml.mil.attention_pooling)")
        self.pooling = pooling
        self.backbone = create_mil_backbone(backbone)
        from ..training.backbones import feature_dim

        d = feature_dim(self.backbone)
        self.size = size
        self.attention = (nn.Sequential(nn.Linear(d, ATTENTION_HIDDEN), nn.ReLU(), nn.Linear(ATTENTION_HIDDEN, 1),
                                        nn.Sigmoid()) if attention else None)
        self.classifier = nn.Linear(d, int(n_classes))

    def instance_features(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[:2]
        x = x.reshape(b * k, *x.shape[2:])
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.backbone(x).reshape(b, k, -1)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled bag representation (B, D), attention weights (B, K) in (0, 1) or None)."""
        h = self.instance_features(x)
        w = None
        if self.attention is not None:
            w = self.attention(h).squeeze(-1)
            if self.pooling == "normalized":
                return (h * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1e-6), w
            h = h * w.unsqueeze(-1)
        return h.mean(dim=1), w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.attend(x)[0])
