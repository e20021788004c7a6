"""DINO (Caron et al. 2021): student/teacher timm backbones, lightly heads, loss and EMA.

Defaults (seed 000: AdamW, lr 1e-3; the rest DINO/lightly):
- ``DINOProjectionHead(dim, 512, 64, 2048, freeze_last_layer=1)`` as in lightly's DINO example
  (the paper's 65536 prototypes are meant for ImageNet; 2048 suits ~10^5 nuclei);
- ``DINOLoss`` with lightly's defaults (settable: ``teacher_temp``, ``warmup_teacher_temp``,
  ``student_temp``, ``center_momentum``): teacher temperature 0.04 (the paper's default; it warms
  up to 0.07 only for long runs), student temperature 0.1, centre momentum 0.9;
  ``warmup_teacher_temp_epochs`` = 5 (lightly's example);
- teacher EMA momentum follows ``cosine_schedule(epoch, max_epochs, 0.996, 1.0)``;
- views: lightly ``DINOTransform`` with global crops = crop size, local crops = crop size · 96/224
  (the paper's ratio) rounded to whole ViT patches (40 px: 16, 80 px: 32), 6 local views, plus
  vertical flips and 90° rotations (histology); ``pretrain.methods.dino.views`` overrides them.
The teacher head is built separately and loaded with the student's state dict because lightly's
``DINOProjectionHead`` (weight norm) cannot be deep-copied. ViT backbones are created with
``dynamic_img_size=True`` so that the local views (smaller than the crop) pass through.
"""

from __future__ import annotations

import torch

from .base import SSLModule, is_vit

TRANSFORM_DEFAULTS = dict(n_local_views=6, hf_prob=0.5, vf_prob=0.5, rr_prob=0.5)


def make_transform(img_size: int, **overrides):
    from lightly.transforms import DINOTransform

    kw = {**TRANSFORM_DEFAULTS, **overrides}
    # DINO's 96/224 of the crop, rounded to whole ViT patches (create_backbone: patch = img_size // 10;
    # 40 px -> 16 px = 4x4 patches of 4, 80 px -> 32 px), which a ResNet does not mind
    patch = max(1, img_size // 10)
    kw.setdefault("local_crop_size", max(patch, round(img_size * 96 / 224 / patch) * patch))
    return DINOTransform(global_crop_size=img_size, **kw)


class DINO(SSLModule):
    default_lr = 1e-3
    not_exported = ("teacher_backbone.", "teacher_head.")  # the EMA teacher is not exported

    def __init__(self, backbone: str, img_size: int, *, lr: float | None = None, hidden_dim: int = 512,
                 bottleneck_dim: int = 64, output_dim: int = 2048, warmup_teacher_temp_epochs: int = 5,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_momentum: float = 0.9, momentum_base: float = 0.996, **kw) -> None:
        super().__init__(lr=lr, **kw)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        from ..training.backbones import create_backbone, feature_dim

        self.save_hyperparameters()
        extra = {"dynamic_img_size": True} if is_vit(backbone) else {}
        self.backbone_model = create_backbone(backbone, img_size=img_size, **extra)
        self.teacher_backbone = create_backbone(backbone, img_size=img_size, **extra)
        self.teacher_backbone.load_state_dict(self.backbone_model.state_dict())
        dim = feature_dim(self.backbone_model)
        self.student_head = DINOProjectionHead(dim, hidden_dim, bottleneck_dim, output_dim, freeze_last_layer=1)
        self.teacher_head = DINOProjectionHead(dim, hidden_dim, bottleneck_dim, output_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.momentum_base = float(momentum_base)
        self.criterion = DINOLoss(output_dim=output_dim, warmup_teacher_temp=warmup_teacher_temp,
                                  teacher_temp=teacher_temp, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
                                  student_temp=student_temp, center_momentum=center_momentum)

    def forward(self, x):
        return self.student_head(self.backbone_model(x))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x))

    def ssl_loss(self, batch):
        views, _, _ = batch
        global_views = views[:2]
        with torch.no_grad():
            teacher_out = [self.forward_teacher(v) for v in global_views]
        student_out = [self(v) for v in views]
        return self.criterion(teacher_out, student_out, epoch=self.current_epoch), views[0].shape[0]

    def training_step(self, batch, batch_idx):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        momentum = cosine_schedule(self.current_epoch, max_epochs, self.momentum_base, 1.0)
        update_momentum(self.backbone_model, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        # lightly's DINOLoss moves its teacher centre in every forward: keep validation out of it
        centre = self.criterion.center.detach().clone()
        loss = super().validation_step(batch, batch_idx)
        self.criterion.center.copy_(centre)
        return loss

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)
