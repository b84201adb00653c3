"""Position-prediction probe: how much absolute (row, col) position is linearly decodable from patch features.

Spec: docs/eval/index.md and ``rasa.md`` §6. Targets of an h x w grid are (i/(h-1), j/(w-1)) in
[0, 1]²; the chance MSE (best constant 0.5) is the target variance
``0.5·[(h+1)/(12(h-1)) + (w+1)/(12(w-1))]``; R² = 1 - MSE / chance.

Probes: ``sigmoid`` (W (2, D) without bias, default init, σ(x Wᵀ), MSE, AdamW lr 2e-4, cosine to 0, 5 epochs, 128
images per step, seed 400; the RASA stage probe) and ``ridge`` (closed-form least squares with bias on centred
features, λ = 1e-3·trace(XᵀX)/D, fp64, no sigmoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._inputs import as_features

PROBES = ("sigmoid", "ridge")


def position_targets(h: int, w: int) -> torch.Tensor:
    """(h, w, 2) fp32 targets: channel 0 = row i/(h-1) (0 at the top), channel 1 = column j/(w-1)."""
    if h < 2 or w < 2:
        raise ValueError(f"position targets need a grid of at least 2x2, got {h}x{w}")
    r = torch.arange(h, dtype=torch.float32) / (h - 1)
    c = torch.arange(w, dtype=torch.float32) / (w - 1)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1)


def chance_mse(h: int, w: int) -> float:
    """MSE of the constant 0.5 predictor on an h x w grid: ½[(h+1)/(12(h-1)) + (w+1)/(12(w-1))]."""
    if h < 2 or w < 2:
        raise ValueError(f"chance level needs a grid of at least 2x2, got {h}x{w}")
    return 0.5 * ((h + 1) / (12 * (h - 1)) + (w + 1) / (12 * (w - 1)))


@dataclass
class PositionResult:
    """``metrics``: ``mse``, ``chance``, ``r2``, ``r2_row``, ``r2_col``, ``mae_patches``;
    ``curve``: per-epoch validation MSE (sigmoid probe; empty for ridge)."""

    metrics: dict[str, float]
    curve: list[float] = field(default_factory=list)
    weight: torch.Tensor | None = None


def _scores(pred: torch.Tensor, h: int, w: int) -> dict[str, float]:
    """pred: (B, h, w, 2) predictions of the val split -> metrics."""
    y = position_targets(h, w).expand_as(pred).double()
    p = pred.double()
    err2 = (p - y) ** 2
    mse = float(err2.mean())
    chance_axes = ((y - 0.5) ** 2).mean(dim=(0, 1, 2))
    chance = float(chance_axes.mean())
    mse_axes = err2.mean(dim=(0, 1, 2))
    scale = torch.tensor([h - 1, w - 1], dtype=torch.float64)
    return {"mse": mse, "chance": chance, "r2": 1.0 - mse / chance,
            "r2_row": float(1 - mse_axes[0] / chance_axes[0]), "r2_col": float(1 - mse_axes[1] / chance_axes[1]),
            "mae_patches": float(((p - y).abs() * scale).mean())}


def position_probe(train_feats: torch.Tensor | np.ndarray, val_feats: torch.Tensor | np.ndarray,
                   probe: str = "sigmoid", epochs: int = 5, lr: float = 2e-4, batch_size: int = 128,
                   seed: int = 400, weight_decay: float = 0.0, device: str | torch.device = "cpu") -> PositionResult:
    """Fit a fresh position probe on ``train_feats`` and score it on ``val_feats``.

    Args:
        train_feats: (B, h, w, D) patch tokens (torch or numpy) of the probe's training images.
        val_feats: (B', h, w, D) patch tokens on the same grid.
        probe: ``sigmoid`` (AdamW-trained σ(x Wᵀ), no bias) or ``ridge`` (closed form).
        epochs, lr, batch_size, seed, weight_decay: sigmoid probe schedule (cosine to 0 per step).
    Returns:
        :class:`PositionResult` with MSE next to its chance level for this grid.
    """
    tr = as_features(train_feats, "train features")
    va = as_features(val_feats, "val features")
    if tr.shape[1:] != va.shape[1:]:
        raise ValueError(f"train features {tuple(tr.shape[1:])} and val features {tuple(va.shape[1:])} differ in "
                         "grid or dimension; extract both at the same size with the same backbone")
    _, h, w, d = tr.shape
    y = position_targets(h, w)
    if probe == "ridge":
        x = tr.reshape(-1, d).double()
        t = y.expand(tr.shape[0], h, w, 2).reshape(-1, 2).double()
        mu, tmu = x.mean(0), t.mean(0)
        xc = x - mu
        gram = xc.T @ xc
        lam = 1e-3 * float(torch.trace(gram)) / d
        wt = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), xc.T @ (t - tmu))
        pred = (va.reshape(-1, d).double() - mu) @ wt + tmu
        return PositionResult(_scores(pred.view(va.shape[0], h, w, 2), h, w), [], wt.T.float())
    if probe != "sigmoid":
        raise ValueError(f"unknown position probe {probe!r}; choose one of {PROBES}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, 2, bias=False).to(device)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(tr.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch), eta_min=0.0)
    tr_d, va_d, yd = tr.to(device), va.to(device), y.to(device)
    curve: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(tr.shape[0], generator=g)
        for i in range(0, tr.shape[0], batch_size):
            xb = tr_d[order[i:i + batch_size].to(device)]
            loss = ((torch.sigmoid(lin(xb)) - yd) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            curve.append(float(((torch.sigmoid(lin(va_d)) - yd) ** 2).mean()))
    with torch.no_grad():
        pred = torch.sigmoid(lin(va_d)).cpu()
    return PositionResult(_scores(pred, h, w), curve, lin.weight.detach().cpu())
