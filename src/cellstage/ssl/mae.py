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

from ..utils import CellstageError
from .base import SSLModule, is_vit

TRANSFORM_DEFAULTS = dict(min_scale=0.2)


def make_transform(img_size: int, **overrides):
    from lightly.transforms import MAETransform

    return MAETransform(input_size=img_size, **{**TRANSFORM_DEFAULTS, **overrides})


class MAE(SSLModule):
    default_lr = 1.5e-4

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

    def training_step(self, batch, batch_idx):
        from lightly.models import utils

        views, _, _ = batch
        images = views[0]
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(b, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device
        )
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        x = self.decoder_embed(encoded)
        tokens = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        decoded = self.decoder(tokens)
        pred = self.prediction_head(utils.get_at_index(decoded, idx_mask))
        patches = utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - 1)  # patches have no class token
        loss = self.criterion(pred, target)
        self._record(loss, b)
        return loss
