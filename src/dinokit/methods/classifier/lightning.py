"""The Lightning side of the classification recipe: ``ClassifierModule`` (SGD + schedule, label-smoothed CE, EMA,
raw and EMA validation, online density crops), the BatchNorm-mode check and ``fit_classifier``.

The recipe itself is in :mod:`dinokit.methods.classifier`; see docs/methods/localisation.md.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import crops as C
from ..training import cosine_schedule, param_groups
from . import CropDataset, EmaEvery, RecipeConfig, bn_in_train_mode, set_bn_eval, step_lr


class ClassifierModule(L.LightningModule):
    """Wires the recipe: SGD + schedule, label-smoothed CE, EMA, raw and EMA validation, running_acc, and the online
    density crops (one backbone forward per batch, on the batch's device)."""

    def __init__(self, model: nn.Module, cfg: RecipeConfig | None = None,
                 density: C.OnlineDensityCrops | None = None, steps_per_epoch: int = 1):
        super().__init__()
        self.model, self.cfg, self.density = model, cfg or RecipeConfig(), density
        self.ema = EmaEvery(model, self.cfg.ema_decay, self.cfg.ema_every)
        self.steps_per_epoch = steps_per_epoch
        self.acc_history: list[float] = []
        self._val = torch.zeros(3, dtype=torch.long)  # correct raw, correct ema, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.density is not None and len(batch) == 3 and self.trainer is not None and self.trainer.training:
            canvas, valid, y = batch
            return self.density(canvas, valid)["images"], y
        return batch

    def on_train_epoch_start(self) -> None:
        e = self.cfg.bn_freeze_after_epoch
        if e is not None and self.current_epoch >= e:
            set_bn_eval(self.model)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.cfg.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.maybe_update(self.model, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, dtype=torch.long, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self._val[0] += (self.model(x).argmax(1) == y).sum()
        self._val[1] += (self.ema.module(x).argmax(1) == y).sum()
        self._val[2] += len(y)

    def on_validation_epoch_end(self) -> None:
        v = self.all_gather(self._val).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else self._val
        n = max(1, int(v[2]))
        acc, acc_ema = float(v[0]) / n, float(v[1]) / n  # sample-weighted
        if not self.trainer.sanity_checking:
            self.acc_history.append(acc)
        running = float(np.mean(self.acc_history)) if self.acc_history else acc
        self.log_dict({"val/acc": acc, "val/acc_ema": acc_ema, "running_acc": running}, sync_dist=False)

    def configure_optimizers(self):
        c = self.cfg
        opt = torch.optim.SGD(param_groups(self.model, c.weight_decay), lr=c.lr, momentum=c.momentum)
        if c.schedule == "step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: step_lr(e, c.lr, c.epochs, c.lr_end) / c.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total, warm = c.epochs * self.steps_per_epoch, c.warmup_epochs * self.steps_per_epoch
        # per-step cosine lr -> lr_end after a linear warm-up from 1% of lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, c.lr, c.lr_end, warm, 0.01)
                                                  / c.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BatchNormTrainCheck(L.Callback):
    """Asserts that BatchNorm is in train mode at every training step (unless ``bn_freeze_after_epoch`` is set)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.cfg.bn_freeze_after_epoch is None and not bn_in_train_mode(pl_module.model):
            raise RuntimeError("BatchNorm layers are in eval mode during training; set bn_freeze_after_epoch to "
                               "reproduce the reference's frozen statistics on purpose")


def fit_classifier(train_set: CropDataset, val_set: CropDataset, model: nn.Module, cfg: RecipeConfig,
                   batch_size: int = 32, num_workers: int = 0, density: C.OnlineDensityCrops | None = None,
                   accelerator: str = "cpu", devices: int | str = 1, precision: str = "32-true", seed: int = 0,
                   out: Path | None = None) -> tuple[dict[str, float], ClassifierModule]:
    """Train with Lightning and return the final metrics (val/acc, val/acc_ema, running_acc, EMA updates)."""
    from torch.utils.data import DataLoader

    L.seed_everything(seed, workers=True, verbose=False)
    world = int(devices) if str(devices).isdigit() else 1
    if batch_size % world:
        raise ValueError(f"global batch {batch_size} is not divisible by {world} devices")
    per_device = batch_size // world
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train_set, per_device, shuffle=True, num_workers=num_workers, drop_last=False,
                          generator=g, persistent_workers=num_workers > 0)
    val_dl = DataLoader(val_set, per_device, shuffle=False, num_workers=num_workers)
    module = ClassifierModule(model, cfg, density, steps_per_epoch=len(train_dl))
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=accelerator, devices=devices, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[BatchNormTrainCheck()],
                        sync_batchnorm=world > 1, num_sanity_val_steps=0, deterministic=False,
                        default_root_dir=str(out) if out else None)
    trainer.fit(module, train_dl, val_dl)
    m = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/acc", "val/acc_ema", "running_acc")}
    m["ema_updates"] = module.ema.updates
    m["missing_box_fallbacks"] = len(train_set.missing_ids)
    if out is not None and trainer.is_global_zero:
        from safetensors.torch import save_file

        from ...io import atomic_path

        for name, net in (("model", module.model), ("ema", module.ema.module)):
            with atomic_path(Path(out) / f"{name}.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    return m, module
