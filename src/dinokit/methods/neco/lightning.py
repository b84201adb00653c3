"""The Lightning module of NeCo: AdamW groups with the cosine lr / weight-decay schedules, the EMA teacher, the
non-finite-step policy and the checkpoint metadata that :func:`dinokit.methods.checkpoints.load_checkpoint_backbone`
reads.

The maths is in :mod:`dinokit.methods.neco`; see docs/methods/neco.md.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from ..training import cosine_schedule, param_groups
from . import NeCo

log = logging.getLogger(__name__)


class NeCoModule(L.LightningModule):
    """Lightning wrapper of :class:`~dinokit.methods.neco.NeCo`.

    Per optimiser step t (``steps_taken``: real steps so far): lr(t) cosine ``lr -> final_lr`` per group,
    weight decay cosine ``weight_decay -> weight_decay_end`` on the decay groups, then the teacher EMA with the
    pre-step student (``on_before_optimizer_step``: once per real step, never for skipped steps or
    micro-batches). A non-finite loss on any rank skips the step on every rank (no backward, step, EMA or queue
    push); 50 in a row stop the run with an error.
    """

    def __init__(self, neco: NeCo, lr_backbone: float = 1e-5, lr_head: float = 1e-4, final_lr: float = 0.0,
                 weight_decay: float = 0.04, weight_decay_end: float = 0.5, total_steps: int = 1,
                 max_consecutive_skips: int = 50, meta: dict | None = None):
        super().__init__()
        self.neco = neco
        self.lr_backbone, self.lr_head, self.final_lr = lr_backbone, lr_head, final_lr
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
        self.total_steps = max(1, int(total_steps))
        self.max_consecutive_skips = max_consecutive_skips
        self.meta = dict(meta or {})
        self.skipped = 0
        self.consecutive_skips = 0
        self.last_finite_loss = float("nan")
        self.last_momentum = float("nan")
        self.inject_nan = False  # tests: force the next loss to NaN
        self.steps_taken = 0  # optimiser steps actually taken (drives lr, weight decay and EMA)
        self._finite = True

    def configure_optimizers(self):
        groups = param_groups({"backbone": self.neco.student, "head": self.neco.student_head}, self.weight_decay,
                              lr={"backbone": self.lr_backbone, "head": self.lr_head})
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).all().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.neco(batch)
        loss = out["loss"]
        if self.inject_nan:
            loss = loss * float("nan")
            self.inject_nan = False
        self._finite = self._all_finite(loss)
        if not self._finite:
            self.skipped += 1
            self.consecutive_skips += 1
            lr = self.lr_at(self.steps_taken)
            log.warning("neco: non-finite loss at step %d (lr %.3g, last finite loss %.6g): step skipped "
                        "(%d skipped so far)", self.steps_taken, lr, self.last_finite_loss, self.skipped)
            self.log("train/skipped_nonfinite", float(self.skipped), batch_size=batch["crops"][0].shape[0])
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise RuntimeError(f"neco: {self.consecutive_skips} consecutive non-finite losses; stopped at "
                                   f"step {self.steps_taken} (lr {lr:.3g}, last finite loss "
                                   f"{self.last_finite_loss:.6g}). Lower the learning rate or use bf16/fp32.")
            return None
        self.consecutive_skips = 0
        self.neco.commit_queues(out)
        self.last_finite_loss = float(loss.detach())
        B = batch["crops"][0].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B, sync_dist=True)
        self.log("train/fallback_rate", batch["n_fallback"].float().mean() / max(1, len(batch["crops"]) - 1),
                 batch_size=B)
        self.log("train/unsatisfied_rate", batch["n_unsatisfied"].float().mean(), batch_size=B)
        return loss

    def lr_at(self, t: int, base: float | None = None) -> float:
        return cosine_schedule(t, self.total_steps, self.lr_backbone if base is None else base, self.final_lr)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this hook (and an optimiser step without gradients) even when training_step returned
        # None: a skipped step changes nothing here and is not counted
        if not self._finite:
            return
        t = self.steps_taken
        self.steps_taken += 1
        wd = cosine_schedule(t, self.total_steps, self.weight_decay, self.weight_decay_end)
        for g in optimizer.param_groups:
            g["lr"] = self.lr_at(t, g["base_lr"])
            if g.get("decay"):
                g["weight_decay"] = wd
        self.last_momentum = self.neco.ema_step(t, self.total_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neco_meta"] = self.meta
        checkpoint["neco_counters"] = {"steps_taken": self.steps_taken, "skipped": self.skipped,
                                       "consecutive_skips": self.consecutive_skips,
                                       "last_finite_loss": self.last_finite_loss}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        c = checkpoint.get("neco_counters", {})
        self.skipped = c.get("skipped", 0)
        self.steps_taken = c.get("steps_taken", 0)
        self.consecutive_skips = c.get("consecutive_skips", 0)
        self.last_finite_loss = c.get("last_finite_loss", float("nan"))
