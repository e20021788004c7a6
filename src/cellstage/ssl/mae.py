"""MAE (He et al. 2022) on a timm ViT: lightly's masked encoder wrapper and TIMM decoder.

Defaults (seed 000: AdamW, lr 1.5e-4; the rest MAE/lightly):
- mask ratio 0.75 (MAE paper), pixel MSE on the masked patches (no per-patch normalisation, as in
  lightly's example);
- decoder: ``MaskedVisionTransformerDecoderTIMM`` width 512, 16 heads, depth 1 (lightly's MAE
  example; the paper uses depth 8 — set ``decoder_depth`` for it);
- views: lightly ``MAETransform`` with ``input_size`` = crop size, ``min_scale`` 0.2 (lightly/MAE
  default), horizontal flip.
The patch size is the backbone's (``create_backbone`` gives img_size/10: 80 px -> 8, 40 px -> 4,
as in seed 000). Only ViT backbones are accepted.
"""

from __future__ import annotations

import torch

from ..utils import CellstageError
from .base import SSLModule, is_vit

TRANSFORM_DEFAULTS = dict(min_scale=0.2)


def make_transform(img_size: int, **overrides):
    from lightly.transforms import MAETransform

    return MAETransform(input_size=img_size, **{**TRANSFORM_DEFAULTS, **overrides})


class MAE(SSLModule):
    default_lr = 1.5e-4
    not_exported = ("encoder.",)  # lightly's wrapper around backbone_model (same tensors) and its unused mask token

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None, mask_ratio: float = 0.75,
                 decoder_dim: int = 512, decoder_depth: int = 1, decoder_num_heads: int = 16, **kw) -> None:
        if not is_vit(backbone):
            raise CellstageError(
                f"mae: backbone {backbone!r} is not a Vision Transformer; MAE masks patch tokens and "
                "needs a ViT backbone (e.g. vit_tiny_patch16_224, vit_small_patch16_224)"
            )
        super().__init__(lr=lr, **kw)
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from torch import nn

        from ..training.backbones import create_backbone

        self.save_hyperparameters()
        vit = create_backbone(backbone, img_size=img_size)
        self.backbone_model = vit
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.encoder.sequence_length
        num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_num_heads, num_prefix_tokens=num_prefix,
        )
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self.criterion = nn.MSELoss()

    def forward(self, images):
        return self.backbone_model(images)

    def _predict_masked(self, images, idx_keep, idx_mask):
        """Predicted pixels of the masked patches, (B, n_masked, patch² · 3)."""
        from lightly.models import utils

        b = images.shape[0]
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        x = self.decoder_embed(encoded)
        tokens = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        decoded = self.decoder(tokens)
        return self.prediction_head(utils.get_at_index(decoded, idx_mask))

    def random_mask(self, b: int, device):
        """(idx_keep, idx_mask) of ``mask_ratio`` of the patch tokens (index 0 = class token, kept)."""
        from lightly.models import utils

        return utils.random_token_mask(size=(b, self.sequence_length), mask_ratio=self.mask_ratio, device=device)

    def ssl_loss(self, batch):
        from lightly.models import utils

        views, _, _ = batch
        images = views[0]
        idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        pred = self._predict_masked(images, idx_keep, idx_mask)
        patches = utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - 1)  # patches have no class token
        return self.criterion(pred, target), images.shape[0]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction) of normalised ``images`` (B, 3, H, W): the masked input has
        its masked patches set to zero (the normalised mean); the reconstruction is the visible
        patches with the predicted ones pasted in (MAE paper, Fig. 2). Masks come from the global
        torch RNG (seed it for a fixed figure)."""
        from lightly.models import utils

        b = images.shape[0]
        idx_keep, idx_mask = self.random_mask(b, images.device)
        pred = self._predict_masked(images, idx_keep, idx_mask)
        patches = utils.patchify(images, self.patch_size)
        masked = utils.set_at_index(patches.clone(), idx_mask - 1, torch.zeros_like(pred))
        recon = utils.set_at_index(patches.clone(), idx_mask - 1, pred.type_as(patches))
        return utils.unpatchify(masked, self.patch_size), utils.unpatchify(recon, self.patch_size)


def reconstruction_figure(model: MAE, crops, out_path, *, seed: int = 0, title: str = "") -> None:
    """Seed 000 Fig. A.2: rows input / masked input / reconstruction for ``crops`` ((N, H, W, 3) uint8,
    N ~ 8 validation crops), normalised as the MAE views (ImageNet mean/std), one fixed random mask."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..utils import atomic_path

    crops = np.asarray(crops)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    was_training = model.training
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    try:
        dev = next(model.parameters()).device
        masked, recon = (t.cpu() for t in model.reconstruct(((x - mean) / std).to(dev)))
    finally:
        torch.random.set_rng_state(gen_state)
        model.train(was_training)
    rows = [("input", x), ("masked", masked * std + mean), ("reconstruction", recon * std + mean)]
    n = len(crops)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), dpi=100, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title or f"MAE reconstructions (mask ratio {model.mask_ratio:g})", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
