"""The linear segmentation probe as a LightningModule, for training on images under a Trainer (DDP, GPUs).

Only the commands and the tests import this module; :mod:`dinokit.eval.linear_seg` stays Lightning-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from .linear_seg import StackedLinearHeads, lr_token, probe_optimiser, segmentation_loss


class LinearSegModule(L.LightningModule):
    """Thin Lightning wrapper: stacked linear heads + :func:`segmentation_loss`, SGD/StepLR (``fast100``) or
    AdamW/warm-up/cosine (``full``). Batches are ``(feats (B, h, w, D), masks (B, H, W))``; with ``backbone``
    given, batches are ``(images (B, 3, H, W), masks)`` and features come from the frozen backbone."""

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float] = (0.01,), protocol: str = "fast100",
                 ignore_index: int | None = 255, steps: int = 1000, epochs: int = 25, steps_per_epoch: int = 40,
                 warmup: int = 1500, backbone: nn.Module | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.heads = StackedLinearHeads(dim, num_classes, len(lrs), "bn" if protocol == "full" else "linear")
        self.backbone = backbone
        if backbone is not None:
            backbone.requires_grad_(False).eval()
        self.automatic_optimization = False

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return x
        with torch.no_grad():
            return self.backbone.forward_features(x).patch.float()

    def training_step(self, batch, batch_idx):
        x, y = batch
        f = self._features(x).permute(0, 3, 1, 2)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        total = 0.0
        for li in range(len(self.hparams.lrs)):
            loss = segmentation_loss(self.heads.head_logits(f, li), y.long(), self.hparams.ignore_index)
            self.manual_backward(loss)
            self.log(f"train/loss_{lr_token(self.hparams.lrs[li])}", loss, prog_bar=False)
            total += float(loss.detach())
        opt.step()
        sched.step()
        return torch.tensor(total)

    def configure_optimizers(self):
        hp = self.hparams
        opt, sched = probe_optimiser(self.heads, hp.protocol, hp.lrs, hp.steps, hp.epochs, hp.steps_per_epoch,
                                hp.warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
