"""The Lightning module of the segmentation heads: frozen or fine-tuned backbone + head, AdamW, warm-up + cosine,
streamed validation mIoU.

The heads, losses and protocols are in :mod:`dinokit.methods.seg_heads`; see docs/methods/barlow_twins.md
(segmentation heads).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from ...backbones import load_backbone
from ..training import cosine_schedule
from . import LOSSES, PROTOCOLS, build_head, new_confusion, protocol_miou, segmentation_loss, update_confusion


class SegmentationModule(pl.LightningModule):
    """Backbone (frozen by default; fine-tuned at 0.1x the head lr with ``freeze_backbone=False``) + head.

    Batches: ``{"image": (B, 3, H, W), "mask": (B, H, W)}``; validation masks at the protocol's resolution
    (``orig``: original; lists allowed). Logs ``train/loss`` and ``val/miou`` (the dense-eval confusion matrix
    over the whole val set, all-reduced under DDP).
    """

    def __init__(self, backbone: str = "demo_vit", weights: str = "random", head: str = "linear",
                 num_classes: int = 21, freeze_backbone: bool = True, loss: str = "ce", lr: float = 5e-3,
                 weight_decay: float = 0.01, warmup_epochs: float = 5, batch_size: int = 32,
                 protocol: str = "orig", recvis_size: int = 224, head_kwargs: dict | None = None,
                 model_kwargs: dict | None = None):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")
        self.save_hyperparameters()
        self.backbone = load_backbone(backbone, weights=weights, model_kwargs=model_kwargs)
        if not self.backbone.is_vit:
            raise ValueError(f"segmentation heads take ViT patch tokens; {backbone} is not a ViT")
        self.head = build_head(head, self.backbone.embed_dim, num_classes, self.backbone.patch_size,
                               **(head_kwargs or {}))
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.cm = None

    def forward(self, x: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.hparams.freeze_backbone:
            self.backbone.eval()
            with torch.no_grad():
                f = self.backbone.forward_features(x)
        else:
            f = self.backbone.forward_features(x)
        return self.head(f, out_size=out_size)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        loss = segmentation_loss(self(x), y, self.hparams.loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.cm = new_confusion(self.hparams.num_classes, self.hparams.protocol)

    def validation_step(self, batch, batch_idx: int) -> None:
        imgs, masks = batch["image"], batch["mask"]
        for i in range(len(imgs)):
            logits = self(imgs[i][None])
            update_confusion(self.cm, logits, masks[i].cpu(), self.hparams.protocol, self.hparams.recvis_size)

    def on_validation_epoch_end(self) -> None:
        self.cm.all_reduce()
        self.log("val/miou", protocol_miou(self.cm, self.hparams.protocol), prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.head.parameters() if p.requires_grad], "lr": hp.lr}]
        if not hp.freeze_backbone:
            groups.append({"params": [p for p in self.backbone.parameters() if p.requires_grad],
                           "lr": 0.1 * hp.lr})
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warm = int(round(hp.warmup_epochs * per_epoch))
        final = min(1.0, 0.1 * hp.batch_size * max(1, self.trainer.world_size) / 256)
        # lr multiplier: from 0 over the warm-up to 1, then a cosine to ``final``
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, 1.0, final, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
