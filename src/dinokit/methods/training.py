"""What the dinokit trainers share: Trainer settings, the warm-up + cosine schedule, LARS and parameter groups.

Pure torch except :func:`trainer_kwargs` (which imports Lightning when called).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn


def trainer_kwargs(accelerator: str, devices: int, precision: str, max_epochs: int, out: Path,
                   max_steps: int = -1) -> dict:
    """Common Trainer settings of the dinokit training commands (CSV logger under ``out``)."""
    from lightning.pytorch.loggers import CSVLogger

    kw: dict = dict(max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=devices,
                    precision=precision, default_root_dir=str(out), logger=CSVLogger(str(out), name="logs"),
                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                    num_sanity_val_steps=0)
    if devices > 1:
        kw["strategy"] = "ddp"
        kw["sync_batchnorm"] = accelerator in ("gpu", "cuda")
    return kw


# ---------------------------------------------------------------------------------------------- schedule
def cosine_schedule(step: int, total: int, start: float, end: float, warmup: int = 0,
                    warmup_start: float = 0.0) -> float:
    """The one warm-up + cosine schedule of dinokit (learning rates, weight decay, EMA momentum).

    For ``step < warmup``: linear warm-up ``start * (w0 + (1 - w0) step / warmup)`` with ``w0 = warmup_start``
    (0: from 0, as Barlow Twins; 0.01: from 1% of ``start``, as the classifier recipe). Then, with
    ``t = step - warmup`` and ``T = total - warmup``: ``end + (start - end) (1 + cos(pi t / T)) / 2``, and
    ``end`` for ``t >= T`` (the cosine never restarts). ``warmup=0`` is the plain cosine of NeCo.

    Args:
        step: optimiser step (or epoch) t >= 0.
        total: the schedule's length, warm-up included.
        start: value at the end of the warm-up (the base value).
        end: final value.
        warmup: warm-up steps.
        warmup_start: first warm-up value as a fraction of ``start``.
    """
    if warmup > 0 and step < warmup:
        return start * (warmup_start + (1 - warmup_start) * step / warmup)
    t, span = step - warmup, total - warmup
    if span <= 0 or t >= span:
        return float(end)
    return float(end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / span)))


# ---------------------------------------------------------------------------------------------- groups
def param_groups(parts: nn.Module | Mapping[str, nn.Module], weight_decay: float,
                 lr: float | Mapping[str, float] | None = None, no_decay_lr: float | None = None) -> list[dict]:
    """Optimiser groups: per part, a decay group then a no-decay group. Frozen parameters are left out.

    No decay (and no LARS adaptation, ``lars_exclude=True``) for biases and every tensor with ndim <= 1 (norms,
    LayerScale); weights and cls/pos/register tokens decay with ``weight_decay``.

    Args:
        parts: one module, or named modules (e.g. ``{"backbone": student, "head": head}``), in group order.
        weight_decay: weight decay of the decay groups (0 for the others).
        lr: the learning rate of every group, or one per part; None leaves it to the optimiser's default.
        no_decay_lr: a separate learning rate for the no-decay groups (the LARS recipe's biases).

    Returns:
        Dicts with ``params``, ``weight_decay``, ``name`` (``<part>_decay`` / ``<part>_no_decay``, or ``decay`` /
        ``no_decay`` for one module), ``decay`` (bool) and ``lars_exclude``; with a learning rate also ``lr`` and
        ``base_lr`` (the value schedules scale).
    """
    named = {"": parts} if isinstance(parts, nn.Module) else dict(parts)
    groups: list[dict] = []
    for tag, module in named.items():
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        part_lr = lr.get(tag) if isinstance(lr, Mapping) else lr
        prefix = f"{tag}_" if tag else ""
        for params, is_decay in ((decay, True), (no_decay, False)):
            g: dict = {"params": params, "weight_decay": weight_decay if is_decay else 0.0,
                       "name": f"{prefix}{'decay' if is_decay else 'no_decay'}", "decay": is_decay,
                       "lars_exclude": not is_decay}
            group_lr = part_lr if is_decay or no_decay_lr is None else no_decay_lr
            if group_lr is not None:
                g["lr"] = g["base_lr"] = group_lr
            groups.append(g)
    return groups


# ---------------------------------------------------------------------------------------------- LARS
class LARS(torch.optim.Optimizer):
    """LARS of the official Barlow Twins recipe: g' = g + wd p, q = eta |p| / |g'| (1 if a norm is 0),
    mu <- momentum mu + q g', p <- p - lr mu. Groups with ``lars_exclude=True`` skip decay and adaptation."""

    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not g["lars_exclude"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(un > 0, g["eta"] * pn / un, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss
