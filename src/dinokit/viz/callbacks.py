"""Figures during training: attention maps, effective receptive fields, Barlow Twins cross-correlation.

The drawing functions (``attention_figure``, ``ccm_figure``, ``overlay_masks``, ``unnormalize``, ``ccm_stats``) are
plain functions; the Lightning callbacks (``AttentionMapCallback``, ``ERFCallback``, ``CrossCorrelationCallback``) are
plain classes (this module imports Lightning; ``dinokit.viz`` does not import it). Every callback runs every
``every_n_epochs`` on validation batch 0 (never during the sanity check) on rank 0, puts the model in eval mode for
the figure and restores its mode, writes ``<log_dir>/figures/<name>/epoch_<e:04d>.png`` atomically and sends it to
the active logger's image API when there is one (TensorBoard ``add_image``, W&B ``log_image``, MLflow
``log_artifact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from .erf import effective_receptive_field, plot_erf
from .figures import save_figure
from .maps import mass_threshold_mask

# a fixed, deterministic palette (matplotlib tab10) for per-head masks
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812))


# ------------------------------------------------------------------------------------------ pure helpers
def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> x * std + mean clipped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5,
                  palette: Sequence[tuple[float, float, float]] = PALETTE) -> np.ndarray:
    """Blend boolean ``masks`` (K, H, W) into float RGB ``image`` (H, W, 3) in [0, 1], mask k in colour k:
    out = (1 - alpha) * out + alpha * colour where mask k is set, applied in order; untouched elsewhere."""
    out = np.array(image, dtype=np.float64, copy=True)
    for k, m in enumerate(np.asarray(masks, dtype=bool)):
        col = np.asarray(palette[k % len(palette)], dtype=np.float64)
        out[m] = (1.0 - alpha) * out[m] + alpha * col
    return out


def crop_to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """Crop (B, C, H, W) top-left to multiples of the patch size ``p`` (as DINO does)."""
    H, W = x.shape[-2:]
    if H < p or W < p:
        raise ValueError(f"images of {H}x{W} are smaller than one {p}-px patch")
    return x[..., : (H // p) * p, : (W // p) * p]


def head_attention(backbone, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """(B, heads, h, w) CLS-query attention of ``block`` per head, renormalised to sum 1 over the patches."""
    return backbone.attention(images, block=block).renormalized()


def attention_figure(path: str | Path, images: torch.Tensor, attn: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float], patch_size: int, tau: float = 0.6, show_mean: bool = True,
                     title: str | None = None) -> Path:
    """One row per image: the un-normalised input, one viridis panel per head (nearest x p, min-max per head), an
    optional head-mean panel, and an overlay of every head's mass-threshold mask (alpha 0.5, fixed palette, with
    contours). ``images`` (n, 3, H, W) normalised, ``attn`` (n, heads, h, w) renormalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    n, heads, h, w = attn.shape
    p = patch_size
    imgs = unnormalize(images[:, :, : h * p, : w * p].float(), mean, std).permute(0, 2, 3, 1).cpu().numpy()
    masks = mass_threshold_mask(attn.float(), tau).cpu().numpy()
    up = attn.float().cpu().numpy().repeat(p, axis=-2).repeat(p, axis=-1)
    mup = masks.repeat(p, axis=-2).repeat(p, axis=-1)
    cols = 1 + heads + int(show_mean) + 1
    fig, axes = plt.subplots(n, cols, figsize=(2 * cols, 2 * n), squeeze=False)
    for r in range(n):
        panels = [("input", imgs[r])] + [(f"head {k}", up[r, k]) for k in range(heads)]
        if show_mean:
            panels.append(("mean", up[r].mean(0)))
        for c, (name, a) in enumerate(panels):
            ax = axes[r][c]
            if a.ndim == 2:
                lo, hi = a.min(), a.max()
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
                ax.imshow(a, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(a, interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=8)
            ax.axis("off")
        ax = axes[r][cols - 1]
        ax.imshow(overlay_masks(imgs[r], mup[r]), interpolation="nearest")
        for k in range(heads):
            if mup[r, k].any() and not mup[r, k].all():
                ax.contour(mup[r, k].astype(float), levels=[0.5], colors=[PALETTE[k % len(PALETTE)]],
                           linewidths=0.8)
        if r == 0:
            ax.set_title(f"masks tau={tau}", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def ccm_stats(c: torch.Tensor, threshold: float = 0.1) -> dict[str, float]:
    """Mean diagonal, mean |off-diagonal| and the fraction of |C_ij| > threshold off the diagonal of (D, D) C."""
    c = c.float()
    D = c.shape[0]
    diag = torch.diagonal(c)
    off = c[~torch.eye(D, dtype=torch.bool, device=c.device)].abs()
    return {"mean_diag": float(diag.mean()), "mean_abs_offdiag": float(off.mean()) if off.numel() else 0.0,
            "frac_offdiag_gt": float((off > threshold).float().mean()) if off.numel() else 0.0}


def ccm_figure(path: str | Path, c: torch.Tensor, max_dims: int = 256, title: str = "cross-correlation") -> Path:
    """Top-left ``max_dims`` x ``max_dims`` block of C with a fixed [-1, 1] diverging scale (1 = red), a colourbar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    block = c[:max_dims, :max_dims].detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(block, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    s = ccm_stats(c)
    ax.set_title(f"{title}\ndiag {s['mean_diag']:.3f}, |off| {s['mean_abs_offdiag']:.3f}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def log_image(trainer, tag: str, path: Path, step: int) -> None:
    """Send a saved PNG to every logger of ``trainer`` that has an image API (no hard dependency on any)."""
    for lg in getattr(trainer, "loggers", []) or []:
        exp = getattr(lg, "experiment", None)
        try:
            if exp is not None and hasattr(exp, "add_image"):  # TensorBoard
                from PIL import Image

                exp.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            elif hasattr(lg, "log_image"):  # W&B
                lg.log_image(key=tag, images=[str(path)], step=step)
            elif exp is not None and hasattr(exp, "log_artifact") and hasattr(lg, "run_id"):  # MLflow
                exp.log_artifact(lg.run_id, str(path), artifact_path=f"figures/{tag}")
        except Exception as err:  # noqa: BLE001 - a logger failure must not stop training
            import warnings

            warnings.warn(f"could not log figure {tag} to {type(lg).__name__}: {err}", stacklevel=2)


def batch_images(batch) -> torch.Tensor:
    """The images of a batch: a tensor, the first element of a (view1, view2, ...) tuple, or ``batch['image']``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for k in ("image", "images", "view1"):
            if k in batch and isinstance(batch[k], torch.Tensor):
                return batch[k]
        raise ValueError(f"cannot find images in a batch with keys {list(batch)}; expected 'image'")
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"cannot find images in a batch of type {type(batch).__name__}")


def _backbone(pl_module):
    bb = getattr(pl_module, "backbone", None)
    if bb is None:
        raise ValueError(f"{type(pl_module).__name__} has no .backbone; the figure callbacks need one")
    return bb


# ------------------------------------------------------------------------------------------ Lightning callbacks
class _FigureCallback(pl.Callback):
    """Shared plumbing: the epoch rule, the figure path and the publication to the loggers."""

    name = "figure"

    def __init__(self, every_n_epochs: int = 1, out_dir: str | Path | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs, self.out_dir = every_n_epochs, None if out_dir is None else Path(out_dir)
        self.paths: list[Path] = []

    def _due(self, trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _path(self, trainer, name: str | None = None) -> Path:
        root = self.out_dir if self.out_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)
        if self.out_dir is None:
            root = root / "figures"
        return root / (name or self.name) / f"epoch_{trainer.current_epoch:04d}.png"

    def _publish(self, trainer, path: Path, tag: str | None = None) -> None:
        self.paths.append(path)
        log_image(trainer, tag or self.name, path, trainer.global_step)


class AttentionMapCallback(_FigureCallback):
    """Last-block CLS attention per head and mass-threshold (tau) masks of the first ``n_images`` images of
    validation batch 0 (view 1 for Barlow Twins)."""

    name = "attention"

    def __init__(self, n_images: int = 6, tau: float = 0.6, block: int = -1, show_mean: bool = True,
                 every_n_epochs: int = 1, out_dir: str | Path | None = None):
        super().__init__(every_n_epochs, out_dir)
        self.n_images, self.tau, self.block, self.show_mean = n_images, tau, block, show_mean

    def setup(self, trainer, pl_module, stage: str) -> None:
        bb = _backbone(pl_module)
        if not hasattr(bb, "attention") or not getattr(bb, "is_vit", False):
            raise ValueError(f"AttentionMapCallback: backbone {getattr(bb, 'name', type(bb).__name__)} has no "
                             "attention API (ViT backbones only); remove the callback for this model")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or not self._due(trainer) or not trainer.is_global_zero:
            return
        bb = _backbone(pl_module)
        x = crop_to_patches(batch_images(batch)[: self.n_images], bb.patch_size)
        was = pl_module.training
        pl_module.eval()
        try:
            attn = head_attention(bb, x, self.block)
        finally:
            pl_module.train(was)
        path = attention_figure(self._path(trainer), x, attn, bb.mean, bb.std, bb.patch_size, self.tau,
                                self.show_mean, title=f"epoch {trainer.current_epoch}")
        self._publish(trainer, path)


class ERFCallback(_FigureCallback):
    """Effective receptive fields of ``layers`` (fnmatch patterns; default: see ``default_erf_layers``),
    the exact mean over the first ``n_images`` images of the first ``batches`` validation batches."""

    name = "erf"

    def __init__(self, layers: Sequence[str] | None = None, n_images: int = 16, batches: int = 1,
                 log_scale: bool = False, every_n_epochs: int = 1, out_dir: str | Path | None = None):
        super().__init__(every_n_epochs, out_dir)
        self.layers, self.n_images, self.batches, self.log_scale = layers, n_images, batches, log_scale
        self._sum: dict[str, torch.Tensor] = {}
        self._count = 0

    def on_validation_epoch_start(self, trainer, pl_module):
        self._sum, self._count = {}, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx >= self.batches or not self._due(trainer) or not trainer.is_global_zero:
            return
        bb = _backbone(pl_module)
        x = batch_images(batch)[: self.n_images]
        if getattr(bb, "is_vit", False):
            x = crop_to_patches(x, bb.patch_size)
        was = pl_module.training
        pl_module.eval()
        try:
            maps = effective_receptive_field(bb, x, self.layers, reduce="sum")
        finally:
            pl_module.train(was)
        for k, v in maps.items():
            self._sum[k] = self._sum[k] + v if k in self._sum else v
        self._count += x.shape[0]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._count or not trainer.is_global_zero:
            return
        maps = {k: v / self._count for k, v in self._sum.items()}
        path = plot_erf(self._path(trainer), maps, log=self.log_scale,
                        title=f"ERF, epoch {trainer.current_epoch}, {self._count} images")
        self._publish(trainer, path)


class CrossCorrelationCallback(_FigureCallback):
    """Exact epoch mean of the loss's ``last_c`` (fp32, on the device), for train and for validation, drawn as
    ``cc_matrix/train`` and ``cc_matrix/val`` with scalars ``cc_matrix/<stage>/{mean_diag,...}``."""

    name = "cc_matrix"

    def __init__(self, max_dims: int = 256, attr: str = "criterion", every_n_epochs: int = 1,
                 out_dir: str | Path | None = None):
        super().__init__(every_n_epochs, out_dir)
        self.max_dims, self.attr = max_dims, attr
        self.sums: dict[str, torch.Tensor | None] = {"train": None, "val": None}
        self.counts = {"train": 0, "val": 0}
        self.means: dict[str, torch.Tensor] = {}

    def _criterion(self, pl_module):
        crit = getattr(pl_module, self.attr, None)
        if crit is None or not hasattr(crit, "last_c"):
            raise ValueError(f"CrossCorrelationCallback: {type(pl_module).__name__}.{self.attr} has no last_c; "
                             "use it with a Barlow Twins module (or set attr=)")
        return crit

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._criterion(pl_module)

    def _reset(self, stage: str) -> None:
        self.sums[stage], self.counts[stage] = None, 0

    def _add(self, stage: str, pl_module) -> None:
        c = self._criterion(pl_module).last_c
        if c is None:
            return
        c = c.float()
        self.sums[stage] = c.clone() if self.sums[stage] is None else self.sums[stage].add_(c)
        self.counts[stage] += 1

    def _draw(self, stage: str, trainer, pl_module) -> None:
        if not self.counts[stage] or not self._due(trainer):
            return
        mean = self.sums[stage] / self.counts[stage]
        self.means[stage] = mean
        for k, v in ccm_stats(mean).items():
            pl_module.log(f"cc_matrix/{stage}/{k}", v)
        if trainer.is_global_zero:
            path = self._path(trainer, f"cc_matrix_{stage}")
            ccm_figure(path, mean, self.max_dims, f"C ({stage}, epoch {trainer.current_epoch}, "
                                                  f"mean of {self.counts[stage]} steps)")
            self._publish(trainer, path, f"cc_matrix/{stage}")

    def on_train_epoch_start(self, trainer, pl_module):
        self._reset("train")

    def on_validation_epoch_start(self, trainer, pl_module):
        self._reset("val")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._add("train", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._add("val", pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._draw("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._draw("val", trainer, pl_module)
