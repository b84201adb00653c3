"""Pictures of dense maps: PCA-to-RGB, heat overlays, DINO-style mass-threshold masks."""

from __future__ import annotations

from pathlib import Path

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


def save_grid(path: str | Path, panels: list[list[np.ndarray]], titles: list[list[str]] | None = None,
              cmap: str = "inferno", overlays: list[list[np.ndarray | None]] | None = None) -> Path:
    """Save a rows x cols grid of images (uint8/float RGB, or 2-D maps drawn with ``cmap``), atomically.

    ``overlays[r][c]``, when given, is a 2-D heat map drawn semi-transparently over that panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels[r]):
                continue
            img = panels[r][c]
            ax.imshow(img, cmap=cmap if img.ndim == 2 else None, interpolation="nearest")
            ov = overlays[r][c] if overlays and c < len(overlays[r]) else None
            if ov is not None:
                ax.imshow(ov, cmap=cmap, alpha=0.55, interpolation="bilinear")
            if titles and c < len(titles[r]):
                ax.set_title(titles[r][c], fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (temp file + rename) in the format of ``path``'s suffix and close it."""
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
