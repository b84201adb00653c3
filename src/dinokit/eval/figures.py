"""Figures of the dense evaluations: label/cluster maps next to ground truth, confusion matrices, probe curves.

All PNGs are written atomically (matplotlib, Agg backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def label_to_rgb(labels: np.ndarray, ignore_index: int | None = 255, seed: int = 0) -> np.ndarray:
    """(H, W) int ids -> (H, W, 3) uint8 colours (fixed random palette; ignore drawn white)."""
    lab = np.asarray(labels).astype(np.int64)
    n = max(256, int(lab.max()) + 1)
    pal = np.random.default_rng(seed).integers(30, 256, size=(n, 3)).astype(np.uint8)
    pal[0] = (0, 0, 0)
    out = pal[np.clip(lab, 0, n - 1)]
    if ignore_index is not None:
        out[lab == ignore_index] = 255
    return out


def save_label_grid(path: str | Path, images: Sequence[np.ndarray], columns: dict[str, Sequence[np.ndarray]],
                    ignore_index: int | None = 255) -> Path:
    """One row per image: the image, then one panel per named label map (GT, clusters, predictions)."""
    from ..viz import save_grid, upsample_map

    panels, titles = [], []
    for i, img in enumerate(images):
        size = img.shape[:2]
        row = [img] + [label_to_rgb(upsample_map(np.asarray(m[i]), size), ignore_index) for m in columns.values()]
        panels.append(row)
        titles.append(["image", *columns])
    return save_grid(path, panels, titles)


def _save(fig, path: str | Path) -> Path:
    from ..viz.maps import save_figure

    return save_figure(fig, path, dpi=110)


def save_confusion(path: str | Path, conf: np.ndarray, class_names: Sequence[str] | None = None,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: ground truth) as a heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(conf, np.float64)
    norm = c / np.maximum(c.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * c.shape[1], 1.0 + 0.35 * c.shape[0]))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(c.shape[0])]
    if c.shape[0] == c.shape[1]:
        ax.set_xticks(range(c.shape[1]), names, rotation=90, fontsize=6)
    ax.set_yticks(range(c.shape[0]), names, fontsize=6)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def save_curves(path: str | Path, curves: dict[str, Sequence[float]], xlabel: str = "epoch", ylabel: str = "",
                title: str = "", hlines: dict[str, float] | None = None) -> Path:
    """Line plot of named curves (e.g. validation mIoU per learning rate), with optional reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, marker=".")
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", c="grey", lw=1)
        ax.text(1, y, name, fontsize=7, va="bottom")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)
