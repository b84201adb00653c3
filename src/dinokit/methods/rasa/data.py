"""Images for RASA stage fitting on a frozen backbone: the training and validation transforms, an images-only view
of any dinokit dataset, validation masks for overclustering, and the frozen-backbone helpers. No Lightning.
See docs/methods/rasa.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- transforms
def rasa_train_transform(crop_size: int = 518, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, photometric: bool = True, geometric: bool = True,
                         normalize_std_typo: bool = False) -> Callable:
    """Training transform: RandomResizedCrop, colour jitter / grayscale / blur, hflip + vflip + rotation
    (U(-90, 90) degrees, p 0.5, nearest, fill 0), normalise. PIL or uint8 (3, H, W) in, float (3, S, S) out.
    The flips and rotation break content-position correlations; the position targets do not move with them."""
    from torchvision.transforms import v2 as T

    std = tuple(std)
    if normalize_std_typo:  # upstream's training transforms used 0.255 for blue (see docs/methods/rasa.md)
        std = (std[0], std[1], 0.255)
    ops: list = [T.ToImage(), T.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio),
                                                  interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if photometric:
        ops += [T.RandomApply([T.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel_size=_blur_kernel(crop_size), sigma=(0.1, 2.0))], p=0.5)]
    if geometric:
        ops += [T.RandomHorizontalFlip(0.5), T.RandomVerticalFlip(0.5),
                T.RandomApply([T.RandomRotation((-90, 90), interpolation=T.InterpolationMode.NEAREST,
                                                expand=False, fill=0)], p=0.5)]
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the crop, odd
    return k


def rasa_val_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> Callable:
    """Validation transform: squash-resize to ``size`` x ``size`` (bilinear, antialias), normalise."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR,
                                            antialias=True), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(list(mean), list(std))])


# --------------------------------------------------------------------------------------------- datasets
def _image_of(item) -> object:
    """The image of a dataset item: a dinokit item dict (``image``), a synthetic ``Scene``, a (PIL, ...) tuple, an
    (H, W, 3) uint8 array or a PIL image."""
    if isinstance(item, dict):
        return item.get("image")
    if hasattr(item, "image") and hasattr(item, "mask"):
        return item.image
    if isinstance(item, tuple | list):
        return item[0]
    return item


class ImagesOnly(Dataset):
    """Images of any dinokit dataset (labels dropped) through ``transform``; bad files give ``None``.

    Args:
        source: an indexable dataset (``ImageFolder``, ``VOCSegmentation``, ``SyntheticScenes``, a list of arrays).
        transform: PIL/uint8 image -> (3, S, S) float tensor.
    """

    def __init__(self, source, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        img = _image_of(self.source[i])
        if img is None:
            return None
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        return self.transform(img)


def collate_images(batch: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack images, dropping bad files (``None``)."""
    items = [b for b in batch if b is not None]
    if not items:
        return torch.zeros(0, 3, 1, 1)
    return torch.stack(items)


def val_masks(source, n: int, size: int) -> torch.Tensor | None:
    """(n', size, size) int64 nearest-resized masks of the first ``n`` items of ``source``; None without masks."""
    import torch.nn.functional as F

    out = []
    for i in range(min(n, len(source))):
        item = source[i]
        m = item.get("mask") if isinstance(item, dict) else getattr(item, "mask", None)
        if m is None:
            return None
        t = torch.as_tensor(np.asarray(m, dtype=np.int64))[None, None].double()
        out.append(F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long())
    return torch.stack(out) if out else None


# --------------------------------------------------------------------------------------------- frozen backbone
@contextlib.contextmanager
def raw_features(backbone):
    """Temporarily disable ``backbone.feature_transform`` (training sees the raw final-norm tokens)."""
    saved = getattr(backbone, "feature_transform", None)
    backbone.feature_transform = None
    try:
        yield backbone
    finally:
        backbone.feature_transform = saved


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode, ``requires_grad=False`` on every parameter."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
