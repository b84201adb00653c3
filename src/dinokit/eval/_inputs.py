"""Input checks shared by the evaluators: features (B, h, w, D), integer masks, resizing rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MaskLike = torch.Tensor | np.ndarray | Sequence[np.ndarray] | Sequence[torch.Tensor]


def as_features(feats: torch.Tensor | np.ndarray, what: str = "features") -> torch.Tensor:
    """(B, h, w, D) torch or numpy (any float dtype) -> fp32 CPU/device tensor (bf16/fp16 upcast)."""
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(np.ascontiguousarray(feats))
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{what} must be a (B, h, w, D) torch.Tensor or numpy array, got {type(feats).__name__}")
    if feats.ndim != 4:
        raise ValueError(f"{what} must have shape (B, h, w, D), got {tuple(feats.shape)}; pass patch tokens "
                         "without CLS/registers (DenseFeatures.patch)")
    if feats.shape[0] == 0:
        raise ValueError(f"{what}: the split is empty (0 images); check the dataset path and split name")
    return feats.float()


def as_masks(masks: MaskLike, n: int | None = None, what: str = "masks") -> list[torch.Tensor] | torch.Tensor:
    """Integer masks: a (B, H, W) array/tensor (returned as int64 tensor) or a list of (H_i, W_i) arrays."""
    if isinstance(masks, np.ndarray | torch.Tensor):
        m = torch.as_tensor(np.ascontiguousarray(masks) if isinstance(masks, np.ndarray) else masks)
        if m.is_floating_point():
            raise TypeError(f"{what} must hold integer class ids, got dtype {m.dtype}; read label PNGs as integers")
        if m.ndim != 3:
            raise ValueError(f"{what} must have shape (B, H, W), got {tuple(m.shape)}")
        out: list[torch.Tensor] | torch.Tensor = m.long()
    else:
        out = [as_masks(np.asarray(x)[None] if not isinstance(x, torch.Tensor) else x[None], what=what)[0]
               for x in masks]
    if n is not None and len(out) != n:
        raise ValueError(f"{what}: {len(out)} masks for {n} feature maps; they must be aligned one-to-one")
    if len(out) == 0:
        raise ValueError(f"{what}: the split is empty (0 images); check the dataset path and split name")
    return out


def check_labels(masks: list[torch.Tensor] | torch.Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Raise if a mask holds a value outside [0, num_classes) that is not the ignore index."""
    items = [masks] if isinstance(masks, torch.Tensor) else masks
    for i, m in enumerate(items):
        u = torch.unique(m)
        bad = u[((u < 0) | (u >= num_classes)) & (u != (ignore_index if ignore_index is not None else -(10**9)))]
        if bad.numel():
            where = "" if isinstance(masks, torch.Tensor) else f" (mask {i})"
            raise ValueError(f"mask labels {bad[:10].tolist()}{where} are outside the class set [0, {num_classes}) "
                             f"and are not the ignore index {ignore_index}; set num_classes / ignore_index to match "
                             "the dataset (docs/eval/index.md)")


def torch_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(mode='nearest')`` of an integer map (B, H, W) or (H, W) to ``size`` (src = floor(dst·in/out))."""
    squeeze = labels.ndim == 2
    x = labels[None] if squeeze else labels
    if tuple(x.shape[-2:]) == tuple(size):
        out = x.long()
    else:
        out = F.interpolate(x[:, None].double(), size=tuple(size), mode="nearest")[:, 0].long()
    return out[0] if squeeze else out
