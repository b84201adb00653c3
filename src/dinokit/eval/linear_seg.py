"""Linear segmentation probe on frozen patch features (docs/eval/linear.md).

Bilinear upsampling is linear, so "upsample features, then 1x1 conv" equals "1x1 conv, then upsample logits";
dinokit does the latter. Several learning rates are trained in one pass over the (cached) features, as DINOv2's
linear evaluation does: one head per learning rate, each in its own optimiser parameter group; every head is
reported under its ``lr{lr}`` token and the best on the validation split is picked (``select="best_val"``, flagged:
the validation split is the evaluation split here, as upstream).

- ``fast100``: head ``Conv2d(D, C, 1)``; SGD lr 0.01, momentum 0.9, wd 1e-4, StepLR x0.1 at epoch 20 of 25, batch
  128, seed 400; logits and GT (torch-nearest) at ``eval_size``² (100; ``None`` = label resolution, i.e. the
  ``fast100@S`` evaluation); cross-entropy over non-ignored pixels; matching ``none``, ``absent="zero"``.
- ``full``: head BatchNorm2d → Dropout2d(0.1) → Conv2d; AdamW lr 1e-3, wd 1e-3, betas (0.9, 0.999), linear warm-up
  from 1e-6·lr over 1,500 iterations then cosine to 0, batch 16; logits bilinearly upsampled to each label map's
  own size; ``absent="nan"``. Sliding-window inference on images is :func:`sliding_window_logits`.

The training loop here is plain torch over cached features (fast, no augmentation beyond an optional paired
horizontal flip of feature and label maps); :class:`LinearSegModule` is the thin Lightning wrapper of the same heads
and loss for Trainer runs (GPU/DDP, or a frozen backbone in the loop with image augmentation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._inputs import MaskLike, as_features, as_masks, check_labels, torch_nearest
from .metrics import ConfusionMatrix, segmentation_scores

PROTOCOLS = ("fast100", "full")
DEFAULT_LRS = {"fast100": (0.01,), "full": (1e-3,)}


def lr_token(lr: float) -> str:
    """``lr{lr}`` key token, e.g. 0.01 -> ``lr0.01``, 1e-3 -> ``lr0.001``."""
    return f"lr{lr:g}"


class StackedLinearHeads(nn.Module):
    """L independent heads on shared features: (B, D, h, w) -> (L, B, C, h, w) logits.

    ``kind="linear"``: Conv2d(D, C, 1) with bias (PyTorch default init); ``kind="bn"``: BatchNorm2d(D) ->
    Dropout2d(p) -> Conv2d(D, C, 1) (protocol ``full``).
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, kind: str = "linear", dropout: float = 0.1):
        super().__init__()
        if kind not in ("linear", "bn"):
            raise ValueError(f"unknown head kind {kind!r}; choose 'linear' or 'bn'")
        self.kind, self.num_classes = kind, num_classes

        def make() -> nn.Module:
            conv = nn.Conv2d(dim, num_classes, 1)
            return conv if kind == "linear" else nn.Sequential(nn.BatchNorm2d(dim), nn.Dropout2d(dropout), conv)

        self.heads = nn.ModuleList(make() for _ in range(num_heads))

    def head_logits(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """(B, D, h, w) -> (B, C, h, w) logits of head ``i``."""
        return self.heads[i](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads])


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255) -> torch.Tensor:
    """Cross-entropy of (B, C, h, w) logits upsampled (bilinear, align_corners=False) to the (B, H, W) target,
    mean over non-ignored pixels (0 when every pixel is ignored)."""
    up = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    ign = -100 if ignore_index is None else ignore_index
    if bool((target != ign).any()):
        return F.cross_entropy(up, target, ignore_index=ign)
    return up.sum() * 0.0


def upsampled_prediction(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) logits -> (B, H, W) argmax after bilinear upsampling."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


def probe_optimiser(heads: StackedLinearHeads, protocol: str, lrs: Sequence[float], steps: int, epochs: int,
               steps_per_epoch: int, warmup: int):
    groups = [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(heads.heads, lrs, strict=True)]
    if protocol == "fast100":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4)
        milestone = max(1, round(epochs * 20 / 25))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s // steps_per_epoch >= milestone else 1.0)
    else:
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-3)

        def lam(s: int) -> float:
            if s < warmup:
                return 1e-6 + (1 - 1e-6) * s / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    return opt, sched


@dataclass
class LinearProbeResult:
    """``metrics``: ``lr{lr}/miou`` and ``lr{lr}/pixel_acc`` per head, ``miou`` / ``pixel_acc`` / ``best_lr`` of the
    head picked on validation; ``curves``: per head (by lr token) the per-epoch ``train_loss`` and ``val_miou``;
    ``confusion``: (C, C) of the picked head; ``heads``: the trained heads."""

    metrics: dict[str, float]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    confusion: np.ndarray | None = None
    heads: StackedLinearHeads | None = None


def _eval_heads(heads: StackedLinearHeads, feats: torch.Tensor, masks, num_classes: int, eval_size: int | None,
                ignore_index: int | None, batch_size: int, device) -> list[ConfusionMatrix]:
    from .metrics import rank_shard

    heads.eval()
    cms = [ConfusionMatrix(num_classes, num_classes, ignore_index) for _ in heads.heads]
    mine = rank_shard(feats.shape[0])  # under DDP each rank scores its shard; matrices are summed below
    with torch.no_grad():
        for s in range(0, len(mine), batch_size):
            ids = mine[s:s + batch_size]
            x = feats[ids].to(device).permute(0, 3, 1, 2)
            logits = heads(x)
            for j, i in enumerate(ids):
                gt = masks[i]
                if eval_size is not None:
                    gt = torch_nearest(gt, (eval_size, eval_size))
                size = tuple(gt.shape[-2:])
                for li, cm in enumerate(cms):
                    cm.update(gt, upsampled_prediction(logits[li, j:j + 1], size)[0].cpu())
    for cm in cms:
        cm.all_reduce()
    return cms


def linear_probe(train_feats: torch.Tensor | np.ndarray, train_masks: MaskLike, val_feats: torch.Tensor | np.ndarray,
                 val_masks: MaskLike, num_classes: int, protocol: str = "fast100", lrs: Sequence[float] | None = None,
                 epochs: int = 25, iterations: int = 40_000, batch_size: int | None = None, eval_size: int | None = 100,
                 ignore_index: int | None = 255, seed: int = 400, hflip: bool = False, warmup: int = 1500,
                 device: str | torch.device = "cpu", class_names: Sequence[str] | None = None,
                 eval_every: int = 1) -> LinearProbeResult:
    """Train one linear head per learning rate on frozen features and evaluate them on the val split.

    Args:
        train_feats: (N, h, w, D) cached patch tokens of the train split; train_masks (N, H, W) labels.
        val_feats: (B, h, w, D) val tokens; val_masks (B, H, W) or a list of (H_i, W_i) label maps (``full``).
        num_classes: C.
        protocol: ``fast100`` (epochs, SGD, StepLR) or ``full`` (iterations, AdamW, warm-up + cosine, BN head).
        lrs: learning rates trained together (default: the protocol's single lr).
        eval_size: ``fast100`` logits/GT side (100); None evaluates at the label resolution.
        hflip: paired horizontal flip of feature and label maps (p 0.5) during training.
        eval_every: evaluate every n epochs for the curves (0: only after the last epoch).
    Returns:
        :class:`LinearProbeResult`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown linear protocol {protocol!r}; choose one of {PROTOCOLS}")
    lrs = tuple(lrs or DEFAULT_LRS[protocol])
    tr = as_features(train_feats, "train features")
    va = as_features(val_feats, "val features")
    if tr.shape[-1] != va.shape[-1]:
        raise ValueError(f"train features have D={tr.shape[-1]}, val features D={va.shape[-1]}; use one backbone")
    tm = as_masks(train_masks, tr.shape[0], "train masks")
    vm = as_masks(val_masks, va.shape[0], "val masks")
    if isinstance(tm, list):
        tm = torch.stack(tm)
    check_labels(tm, num_classes, ignore_index)
    check_labels(vm, num_classes, ignore_index)
    if protocol == "fast100" and eval_size is not None:
        tm = torch_nearest(tm, (eval_size, eval_size))
    full = protocol == "full"
    bs = batch_size or (16 if full else 128)
    n = tr.shape[0]
    drop_last = n >= bs
    steps_per_epoch = n // bs if drop_last else 1
    if full:
        epochs = max(1, math.ceil(iterations / steps_per_epoch))
    total = iterations if full else epochs * steps_per_epoch
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    heads = StackedLinearHeads(tr.shape[-1], num_classes, len(lrs), "bn" if full else "linear").to(device)
    opt, sched = probe_optimiser(heads, protocol, lrs, total, epochs, steps_per_epoch, warmup)
    tokens = [lr_token(lr) for lr in lrs]
    curves = {t: {"train_loss": [], "val_miou": []} for t in tokens}
    step = 0
    for ep in range(epochs):
        heads.train()
        order = torch.randperm(n, generator=g)
        losses = torch.zeros(len(lrs))
        nb = 0
        for s in range(0, steps_per_epoch * bs if drop_last else n, bs):
            if step >= total:
                break
            idx = order[s:s + bs]
            x = tr[idx].permute(0, 3, 1, 2)
            y = tm[idx]
            if hflip:
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                y = torch.where(flip[:, None, None], y.flip(-1), y)
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            for li in range(len(lrs)):  # one backward per head keeps only one upsampled logit map alive
                loss = segmentation_loss(heads.head_logits(x, li), y, ignore_index)
                loss.backward()
                losses[li] += float(loss.detach())
            opt.step()
            sched.step()
            step += 1
            nb += 1
        last = ep == epochs - 1
        if last or (eval_every > 0 and (ep + 1) % eval_every == 0):
            cms = _eval_heads(heads, va, vm, num_classes, eval_size if not full else None, ignore_index, 64, device)
            for t, cm, li in zip(tokens, cms, range(len(lrs)), strict=True):
                curves[t]["train_loss"].append(float(losses[li] / max(1, nb)))
                curves[t]["val_miou"].append(cm.compute("none", absent="nan" if full else "zero")["miou"])
    absent = "nan" if full else "zero"
    metrics: dict[str, float] = {}
    per_head = []
    for t, cm in zip(tokens, cms, strict=True):
        sc = segmentation_scores(cm.numpy(), absent=absent, class_names=class_names)
        per_head.append((sc, cm))
        metrics[f"{t}/miou"] = sc["miou"]
        metrics[f"{t}/pixel_acc"] = sc["pixel_acc"]
    best = int(np.nanargmax([sc["miou"] for sc, _ in per_head]))
    metrics.update({k: v for k, v in per_head[best][0].items()})
    metrics["best_lr"] = float(lrs[best])
    return LinearProbeResult(metrics, curves, per_head[best][1].numpy(), heads)


def sliding_window_logits(feature_fn: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, image: torch.Tensor,
                          crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Protocol ``full`` inference: (1, 3, H, W) normalised image -> (1, C, H, W) logits averaged over overlapping
    ``crop`` x ``crop`` windows with ``stride`` (logits of each window bilinearly upsampled to the window).

    ``feature_fn`` maps (1, 3, c, c) to (1, h, w, D) patch tokens (e.g. ``lambda x: backbone(x)[0].patch``).
    """
    _, _, hh, ww = image.shape
    out = image.new_zeros(1, num_classes, hh, ww)
    count = image.new_zeros(1, 1, hh, ww)
    ys = list(range(0, max(hh - crop, 0) + 1, stride)) or [0]
    xs = list(range(0, max(ww - crop, 0) + 1, stride)) or [0]
    if ys[-1] + crop < hh:
        ys.append(hh - crop)
    if xs[-1] + crop < ww:
        xs.append(ww - crop)
    for y0 in ys:
        for x0 in xs:
            win = image[..., y0:y0 + crop, x0:x0 + crop]
            logits = head(feature_fn(win).permute(0, 3, 1, 2))
            out[..., y0:y0 + win.shape[-2], x0:x0 + win.shape[-1]] += F.interpolate(
                logits, size=tuple(win.shape[-2:]), mode="bilinear", align_corners=False)
            count[..., y0:y0 + win.shape[-2], x0:x0 + win.shape[-1]] += 1
    return out / count
