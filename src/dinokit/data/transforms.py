"""Image <-> tensor helpers shared by every pipeline."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor_batch(images: list[np.ndarray] | np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> normalised float (B, 3, H, W) on ``device`` (normalised there)."""
    arr = np.stack(images) if isinstance(images, list) else images
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
