"""Every static figure of dinokit: grids of images and maps, label maps, confusion matrices, curves, box overlays.

Each function draws with matplotlib (Agg backend) and writes the file atomically through :func:`save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_path
from .maps import upsample_map


def pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: matplotlib costs ~0.5 s to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(path: str | Path, panels: list[list[np.ndarray]], titles: list[list[str]] | None = None,
              cmap: str = "inferno", overlays: list[list[np.ndarray | None]] | None = None) -> Path:
    """Save a rows x cols grid of images (uint8/float RGB, or 2-D maps drawn with ``cmap``), atomically.

    ``overlays[r][c]``, when given, is a 2-D heat map drawn semi-transparently over that panel.
    """
    plt = pyplot()
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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return path


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
    panels, titles = [], []
    for i, img in enumerate(images):
        size = img.shape[:2]
        row = [img] + [label_to_rgb(upsample_map(np.asarray(m[i]), size), ignore_index) for m in columns.values()]
        panels.append(row)
        titles.append(["image", *columns])
    return save_grid(path, panels, titles)


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=110)


def save_confusion(path: str | Path, conf: np.ndarray, class_names: Sequence[str] | None = None,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: ground truth) as a heat map."""
    plt = pyplot()

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
    plt = pyplot()

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


def draw_box_overlays(path: Path, images: list, ids: list[str], pred: dict, gts: list | None) -> None:
    """Save a row of images with predicted (red, dashed) and ground-truth (green) ``[x, y, w, h]`` boxes."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for ax, im, i, g in zip(axes[0], images, ids, gts if gts is not None else [None] * n):
        ax.imshow(im)
        ax.axis("off")
        for b in (g if g is not None else []):
            ax.add_patch(Rectangle((b[0], b[1]), b[2], b[3], fill=False, ec="lime", lw=1.2))
        x, y, w, h = pred[i]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="red", lw=1.5, ls="--"))
        ax.set_title(str(i)[-10:], fontsize=7)
    fig.suptitle("pseudo-box (red, dashed) vs ground truth (green)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def save_rasa_stage_curve(path: str | Path, stages: Sequence[int], mse: Sequence[float], chance: Sequence[float],
                          committed: Sequence[bool], title: str = "RASA") -> Path:
    """RASA's per-stage curve: validation MSE of each stage's fresh position probe vs the chance level; stages whose
    probe was not committed (the stopping or audit probe) are marked with a red x."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(stages, mse, "o-", label="fresh probe val MSE")
    ax.plot(stages, chance, "k--", label="chance")
    for t, m, c in zip(stages, mse, committed):
        if not c:
            ax.plot([t], [m], "rx", ms=9)
    ax.set_xlabel("stage t (probe on x^(t-1); x = not committed)")
    ax.set_ylabel("position MSE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
