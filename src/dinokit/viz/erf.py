"""Effective receptive fields (Luo et al. 2016): mean |d s / d x| of a layer's central unit, per layer.

For each selected layer, s = sum_b sum_c y[b, c, i*, j*] (the channel-summed central unit, or one ``channel``);
g = autograd.grad(s, x); the map is the mean over images and RGB channels of |g|, shape (H, W). The model runs
in eval mode (BatchNorm uses running statistics), so images are independent and one backward per layer gives
every image its own gradient. Works for CNN feature maps (B, C, H_l, W_l) and ViT tokens (B, N, D) reshaped
row-major to the (h, w) patch grid after dropping the prefix (CLS + register) tokens.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .figures import save_figure

LAYOUTS = ("auto", "nchw", "nlc", "nhwc")


def _target(model: nn.Module) -> tuple[nn.Module, int, int | None]:
    """(module whose named_modules are matched, num_prefix_tokens, patch size or None)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "patch_size") and hasattr(model, "num_prefix_tokens"):
        is_vit = bool(getattr(model, "is_vit", True))
        return inner, int(model.num_prefix_tokens), int(model.patch_size) if is_vit else None
    return model, 0, None


def default_erf_layers(model: nn.Module) -> list[str]:
    """Defaults: ViTs -> the patch embedding, every ceil(depth/4)-th block and the last block; ResNets -> conv1 and
    layer1-4; anything else -> every top-level child."""
    root, _, _ = _target(model)
    names = dict(root.named_modules())
    blocks = getattr(root, "blocks", None)
    if blocks is not None and "patch_embed" in names:
        depth = len(blocks)
        step = max(1, math.ceil(depth / 4))
        idx = sorted(set(range(step - 1, depth, step)) | {depth - 1})
        return ["patch_embed", *[f"blocks.{i}" for i in idx]]
    res = [n for n in ("conv1", "layer1", "layer2", "layer3", "layer4") if n in names]
    return res or [n for n, _ in root.named_children()]


def select_layers(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Module names of ``model`` (a Backbone's timm model) matching fnmatch ``patterns``, in module order."""
    root, _, _ = _target(model)
    if patterns is None:
        return default_erf_layers(model)
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [n for n, _ in root.named_modules() if n]
    out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not out:
        raise ValueError(f"no module of {type(root).__name__} matches {pats}; available names start with "
                         f"{names[:12]} (fnmatch patterns such as 'blocks.*' or 'layer[1-4]')")
    return out


def token_centre(grid: tuple[int, int]) -> tuple[int, int]:
    """Central cell (h // 2, w // 2) of an (h, w) grid, e.g. (1, 2) for a 3x5 grid."""
    return grid[0] // 2, grid[1] // 2


def _seed(y: torch.Tensor, name: str, layout: str, n_prefix: int, grid: tuple[int, int] | None,
          channel: int | None) -> torch.Tensor:
    """The scalar s (summed over the batch) of layer output ``y`` in the given layout."""
    if isinstance(y, tuple | list):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"layer {name!r} returns {type(y).__name__}, not a tensor; choose another layer")
    lay = layout
    if lay == "auto":
        if y.ndim == 4:
            if grid is not None and tuple(y.shape[1:3]) == grid:
                lay = "nhwc"
            elif grid is None or tuple(y.shape[2:]) == grid:
                lay = "nchw"
        elif y.ndim == 3 and grid is not None and y.shape[1] in (n_prefix + grid[0] * grid[1], grid[0] * grid[1]):
            lay = "nlc"
        if lay == "auto":
            raise ValueError(f"layer {name!r} output of shape {tuple(y.shape)} is neither a feature map (B, C, H, W) "
                             f"nor tokens (B, N, D) on the grid {grid} (prefix {n_prefix}); pick a block / conv / "
                             "linear layer or pass layout='nchw'|'nlc'|'nhwc'")
    if lay == "nchw":
        if y.ndim != 4:
            raise ValueError(f"layer {name!r}: layout 'nchw' needs a 4-D output, got {tuple(y.shape)}")
        fm = y
    elif lay == "nhwc":
        if y.ndim != 4:
            raise ValueError(f"layer {name!r}: layout 'nhwc' needs a 4-D output, got {tuple(y.shape)}")
        fm = y.permute(0, 3, 1, 2)
    elif lay == "nlc":
        if y.ndim != 3 or grid is None:
            raise ValueError(f"layer {name!r}: layout 'nlc' needs (B, N, D) tokens and a known grid, "
                             f"got {tuple(y.shape)}, grid {grid}")
        n = grid[0] * grid[1]
        tok = y[:, y.shape[1] - n:] if y.shape[1] == n + n_prefix else y
        if tok.shape[1] != n:
            raise ValueError(f"layer {name!r}: {y.shape[1]} tokens do not fit the {grid} grid + {n_prefix} prefix")
        fm = tok.reshape(y.shape[0], grid[0], grid[1], y.shape[2]).permute(0, 3, 1, 2)
    else:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    i, j = token_centre((fm.shape[2], fm.shape[3]))
    unit = fm[:, :, i, j]
    if channel is not None:
        if not 0 <= channel < unit.shape[1]:
            raise ValueError(f"channel {channel} out of range for layer {name!r} with {unit.shape[1]} channels")
        unit = unit[:, channel]
    return unit.sum()


def effective_receptive_field(model: nn.Module, images: torch.Tensor, layers: str | Sequence[str] | None = None,
                              layout: str = "auto", channel: int | None = None,
                              reduce: str = "mean") -> dict[str, torch.Tensor]:
    """ERF maps of ``layers`` (fnmatch patterns; default :func:`default_erf_layers`) for (B, 3, H, W) ``images``.

    ``model``: a dinokit ``Backbone`` (layers are named inside its timm ``model``; prefix tokens and the patch grid
    come from the backbone contract) or any ``nn.Module`` taking images. Returns name -> (H, W) float32 CPU maps:
    the mean (``reduce="mean"``) or the sum (``"sum"``, for exact accumulation over batches) over images of the
    RGB-mean |gradient|. The model's training mode is restored afterwards.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
    root, n_prefix, p = _target(model)
    names = select_layers(model, layers)
    mods = dict(root.named_modules())
    H, W = images.shape[-2:]
    grid = (H // p, W // p) if p else None
    outputs: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n in names]
    was_training = model.training
    model.eval()
    try:
        # leave Lightning's validation inference mode / no_grad: the ERF is a gradient
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().float().requires_grad_(True)
            if hasattr(model, "forward_features"):
                model.forward_features(x)
            else:
                model(x)
            res = {}
            for k, n in enumerate(names):
                if n not in outputs:
                    raise ValueError(f"layer {n!r} did not run in the forward pass")
                s = _seed(outputs[n], n, layout, n_prefix, grid, channel)
                (g,) = torch.autograd.grad(s, x, retain_graph=k < len(names) - 1, allow_unused=True)
                if g is None:
                    g = torch.zeros_like(x)
                m = g.abs().mean(1)  # (B, H, W)
                res[n] = (m.sum(0) if reduce == "sum" else m.mean(0)).detach().float().cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return res


def plot_erf(path: str | Path, maps: dict[str, torch.Tensor | np.ndarray], log: bool = False,
             title: str | None = None) -> Path:
    """One panel per layer (titled with its name), (m - min)/(max - min) scaling (optionally of log(m + tiny)),
    the centre pixel marked; saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    n = len(maps)
    if n == 0:
        raise ValueError("no ERF maps to plot")
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        a = np.asarray(m, dtype=np.float64)
        if log:
            a = np.log(a + max(a.max() * 1e-6, 1e-30))
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        ax.imshow(a, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        ci, cj = token_centre(a.shape)
        ax.plot([cj], [ci], marker="+", color="cyan", markersize=6)
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
