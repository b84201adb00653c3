"""Pictures of dense maps: PCA-to-RGB, heat overlays, DINO-style mass-threshold masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mass_threshold_mask(attn: torch.Tensor, tau: float = 0.6) -> torch.Tensor:
    """Boolean mask (..., h, w) keeping the fewest patches whose attention mass reaches ``tau``.

    ``attn`` (..., h, w) is renormalised to sum 1 over (h, w) first (DINO's visualisation rule: sort
    descending, keep the prefix whose cumulative mass first reaches tau, ties broken by index).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    shape = attn.shape
    a = attn.reshape(-1, shape[-2] * shape[-1]).float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    vals, idx = a.sort(dim=-1, descending=True, stable=True)  # stable: ties broken by index
    cum = vals.cumsum(-1)
    keep_sorted = (cum - vals) < tau  # include the element that crosses tau
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, idx, keep_sorted)
    return keep.reshape(shape)


def pca_rgb(patch: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
    """(B, h, w, D) features -> (B, h, w, 3) float RGB in [0, 1]: first 3 principal components, fitted
    jointly on the batch, each min-max scaled (registers are never part of ``patch``)."""
    B, h, w, D = patch.shape
    x = patch.reshape(-1, D).float()
    x = x - x.mean(0, keepdim=True)
    q = min(3, D, x.shape[0])
    _, _, v = torch.pca_lowrank(x, q=q, center=False)
    y = x @ v[:, :q]
    if q < 3:
        y = torch.cat([y, y.new_zeros(y.shape[0], 3 - q)], 1)
    lo, hi = y.min(0).values, y.max(0).values
    y = (y - lo) / (hi - lo).clamp_min(1e-8)
    return y.reshape(B, h, w, 3).cpu().numpy()


def upsample_map(m: torch.Tensor | np.ndarray, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """(h, w[, C]) map -> (H, W[, C]) numpy at image resolution."""
    t = torch.as_tensor(np.asarray(m), dtype=torch.float32)
    chan = t.ndim == 3
    t = t.permute(2, 0, 1)[None] if chan else t[None, None]
    t = F.interpolate(t, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return (t[0].permute(1, 2, 0) if chan else t[0, 0]).numpy()


# TODO(layout): the figure writers moved to viz/figures.py; this re-export goes once every caller imports from there
def save_figure(*args, **kwargs):  # noqa: D103
    from .figures import save_figure as f

    return f(*args, **kwargs)
