"""The Lightning module of Barlow Twins: optimiser, warm-up + cosine schedule, logging, checkpoints.

The maths is in :mod:`dinokit.methods.barlow_twins`; see docs/methods/barlow_twins.md.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from ...backbones import load_backbone
from ..training import LARS, cosine_schedule, param_groups
from . import BarlowTwins, BarlowTwinsLoss, convert_batchnorm


class BarlowTwinsModule(pl.LightningModule):
    """Lightning wrapper: batches are (view1, view2); AdamW (or LARS), warm-up + cosine stepped per optimiser
    step, the loss logged as ``train/loss`` / ``val/loss``. ``weights`` goes to ``load_backbone`` (a dino_*
    name with ``"pretrained"`` starts from DINO weights; ``"random"``; or a file).

    Args mirror ``dinokit bt fit`` (:func:`dinokit.commands.bt.fit`).
    """

    def __init__(self, backbone: str = "demo_vit", weights: str = "random", projector: str = "small",
                 pool: str = "cls", lambd: float = 0.0051, norm: str = "batchnorm", eps: float = 1e-5,
                 optimizer: str = "adamw", lr: float = 3e-4, lr_scaling: str = "none", weight_decay: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_epochs: float = 10, batch_size: int = 256,
                 model_kwargs: dict | None = None):
        super().__init__()
        if optimizer not in ("adamw", "lars"):
            raise ValueError(f"optimizer={optimizer!r}; choose 'adamw' or 'lars'")
        if lr_scaling not in ("none", "linear"):
            raise ValueError(f"lr_scaling={lr_scaling!r}; choose 'none' or 'linear'")
        self.save_hyperparameters()
        bb = load_backbone(backbone, weights=weights, model_kwargs=model_kwargs)
        self.model = BarlowTwins(bb, projector, pool, lambd, norm, eps)

    @property
    def backbone(self):
        """The dinokit Backbone being trained (``model.backbone``; stored once in the checkpoint)."""
        return self.model.backbone

    @property
    def criterion(self) -> BarlowTwinsLoss:
        return self.model.criterion

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # early dinokit checkpoints stored the backbone twice (backbone.* and model.backbone.*)
        sd = checkpoint.get("state_dict", {})
        if any(k.startswith("model.backbone.") for k in sd):
            for k in [k for k in sd if k.startswith("backbone.")]:
                del sd[k]

    def setup(self, stage: str) -> None:
        # before the optimisers and the DDP wrapper exist: make every BatchNorm global-batch on non-CUDA DDP
        # (CUDA DDP: Trainer(sync_batchnorm=True) converts to nn.SyncBatchNorm)
        trainer = self.trainer
        if trainer.world_size > 1 and trainer.strategy.root_device.type != "cuda":
            self.model.projector = convert_batchnorm(self.model.projector, "cpu")
            self.model.backbone = convert_batchnorm(self.model.backbone, "cpu")

    def _step(self, batch, stage: str) -> torch.Tensor:
        x1, x2 = batch[0], batch[1]
        loss = self.model(x1, x2)
        n = x1.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
        self.log(f"{stage}/on_diag", self.criterion.last_terms["on_diag"], batch_size=n)
        self.log(f"{stage}/off_diag", self.criterion.last_terms["off_diag"], batch_size=n)
        self.log(f"{stage}/rank_bound", self.criterion.rank_bound, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams
        B = hp.batch_size * max(1, self.trainer.world_size if self._trainer is not None else 1)
        if hp.optimizer == "lars":
            opt = LARS(param_groups(self.model, hp.weight_decay, lr=0.2 * B / 256, no_decay_lr=0.0048 * B / 256),
                       lr=0.2 * B / 256, weight_decay=hp.weight_decay)
        else:
            lr = hp.lr * (B / 256 if hp.lr_scaling == "linear" else 1.0)
            opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warm = int(round(hp.warmup_epochs * per_epoch))
        # lr multiplier: from 0 over the warm-up to 1, then a cosine to 0.001
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, 1.0, 0.001, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
