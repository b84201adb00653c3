"""NeCo multi-crop views with overlap boxes (see docs/methods/neco.md).

``NeCoViews(image)`` draws 2 global + N local crops with torchvision ``RandomResizedCrop.get_params`` (torch global
RNG), each constrained to overlap every global crop drawn before it by more than ``t = floor(min_intersection * W *
H)`` pixels (``2t`` for the second global crop). After ``max_resample`` rejected draws it falls back to the
intersection of the global boxes drawn so far (no random numbers consumed); samples that still miss the rule (only
extremely elongated images) are kept and counted. Each crop is resized, photometrically augmented and normalised
before the next crop's geometry is drawn (the reference transform's RNG order).

``crop_intersection_boxes`` turns the crop boxes (original pixels) into the pairwise intersection boxes in each
crop's pixel frame: ``gc`` (2, K, 4) with ``gc[g, k]`` = box_g ∩ box_k in g's frame, and ``all`` (K, 2, 4) with
``all[k, g]`` = the same intersection in k's frame, float32 (x1, y1, x2, y2).

Images smaller than a crop size are upsampled by the resize (documented fallback, logged once per process).
No model runs in ``__getitem__``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)
_WARNED_SMALL = False


def box_area(b: torch.Tensor) -> torch.Tensor:
    """Area of (…, 4) boxes (x1, y1, x2, y2); negative widths clamp to 0."""
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise intersection of (…, 4) boxes (may be empty: x2 <= x1)."""
    return torch.cat([torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])], -1)


def to_frame(box: torch.Tensor, crop: torch.Tensor, size: float | torch.Tensor) -> torch.Tensor:
    """Map (…, 4) boxes in original pixels into the pixel frame of ``crop`` (…, 4) resized to ``size`` x ``size``:
    x -> S (x - x1) / w, y -> S (y - y1) / h."""
    size = torch.as_tensor(size, dtype=box.dtype, device=box.device)
    w = (crop[..., 2] - crop[..., 0]).unsqueeze(-1)
    h = (crop[..., 3] - crop[..., 1]).unsqueeze(-1)
    s = size.reshape(size.shape + (1,)) if size.ndim else size
    x = s * (box[..., 0::2] - crop[..., 0:1]) / w
    y = s * (box[..., 1::2] - crop[..., 1:2]) / h
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def crop_intersection_boxes(boxes: torch.Tensor, sizes: Sequence[int],
                            n_global: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise global/crop intersections in each crop's frame.

    Args:
        boxes: (K, 4) crop boxes (x1, y1, x2, y2) in original pixels, globals first.
        sizes: the K output sides S_k.
        n_global: number of global crops (the first ones).

    Returns:
        ``gc`` (n_global, K, 4): gc[g, k] = box_g ∩ box_k in g's frame; ``all`` (K, n_global, 4): all[k, g] = the
        same intersection in k's frame (float32).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    K = boxes.shape[0]
    if boxes.shape != (K, 4) or len(sizes) != K or K < n_global:
        raise ValueError(f"boxes must be (K, 4) with K = len(sizes) >= {n_global}; got {tuple(boxes.shape)} and "
                         f"{len(sizes)} sizes")
    S = torch.as_tensor(list(sizes), dtype=torch.float64)
    inter = box_intersection(boxes[:n_global, None], boxes[None])  # (G, K, 4) original pixels
    gc = to_frame(inter, boxes[:n_global, None].expand_as(inter), S[:n_global, None].expand(n_global, K))
    all_ = to_frame(inter.transpose(0, 1), boxes[:, None].expand(K, n_global, 4), S[:, None].expand(K, n_global))
    return gc.float(), all_.float()


class PILGaussianBlur:
    """PIL Gaussian blur with radius ~ U(sigma_min, sigma_max) drawn from Python's ``random``."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma_min, self.sigma_max)))


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image array, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    raise TypeError(f"NeCoViews needs a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


@dataclass
class NeCoViews:
    """The NeCo multi-crop transform. Defaults are the DINOv2 configs (2 x 518 px global, 4 x 98 px local).

    ``__call__(image)`` -> dict: ``crops`` list of K tensors (3, S_k, S_k), ``boxes`` (K, 4) crop boxes in original
    pixels, ``gc`` (2, K, 4), ``all`` (K, 2, 4), ``n_fallback`` and ``n_unsatisfied`` (ints).
    """

    crops: tuple[int, int] = (2, 4)
    sizes: tuple[int, int] = (518, 98)
    scale_min: tuple[float, float] = (0.25, 0.05)
    scale_max: tuple[float, float] = (1.0, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_intersection: float = 0.01
    jitter_strength: float = 1.0
    blur_strength: float = 1.0
    max_resample: int = 100
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if len(self.crops) != 2 or self.crops[0] != 2 or self.crops[1] < 0:
            raise ValueError(f"crops={self.crops}: NeCo needs [2 global, N >= 0 local] crops")
        for name in ("sizes", "scale_min", "scale_max"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name}={getattr(self, name)} must have 2 entries (global, local)")
        for lo, hi in zip(self.scale_min, self.scale_max):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crop scales must satisfy 0 < scale_min <= scale_max <= 1, got {lo}, {hi}")
        if min(self.sizes) < 1 or self.max_resample < 0 or not 0 <= self.min_intersection < 1:
            raise ValueError(f"bad NeCoViews settings: sizes={self.sizes}, max_resample={self.max_resample}, "
                             f"min_intersection={self.min_intersection}")
        j, b = self.jitter_strength, self.blur_strength
        self._photo = T.Compose([
            T.RandomApply([T.ColorJitter(0.8 * j, 0.8 * j, 0.8 * j, 0.2 * j)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur(0.1 * b, 2.0 * b)], p=0.5),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    @property
    def n_crops(self) -> int:
        return self.crops[0] + self.crops[1]

    @property
    def crop_sizes(self) -> list[int]:
        return [self.sizes[0]] * self.crops[0] + [self.sizes[1]] * self.crops[1]

    def _draw(self, img, i: int, globals_: list[torch.Tensor], t: int) -> tuple[torch.Tensor, bool]:
        """Crop box i (x1, y1, x2, y2) and whether the fallback was used."""
        kind = 0 if i < self.crops[0] else 1
        scale, need = (self.scale_min[kind], self.scale_max[kind]), (2 * t if kind == 0 else t)
        for _ in range(self.max_resample + 1):
            top, left, h, w = T.RandomResizedCrop.get_params(img, scale, list(self.ratio))
            box = torch.tensor([left, top, left + w, top + h], dtype=torch.float64)
            if all(box_area(box_intersection(box, g)) > need for g in globals_):
                return box, False
        fb = globals_[0]
        for g in globals_[1:]:
            fb = box_intersection(fb, g)
        return fb.clone(), True

    def draw_boxes(self, W: int, H: int) -> tuple[torch.Tensor, int, int]:
        """Geometry only, for a W x H image: (K, 4) boxes, n_fallback, n_unsatisfied. Same rules as ``__call__``
        but without the photometric draws in between (so a different RNG stream)."""
        ref = torch.empty(1, 1, 1).expand(3, H, W)  # get_params only reads the size
        t = math.floor(self.min_intersection * W * H)
        boxes: list[torch.Tensor] = []
        n_fb = n_unsat = 0
        for i in range(self.n_crops):
            box, fb, ok = self._next(ref, i, boxes, t)
            boxes.append(box)
            n_fb, n_unsat = n_fb + int(fb), n_unsat + int(not ok)
        return torch.stack(boxes), n_fb, n_unsat

    def _next(self, ref, i: int, boxes: list[torch.Tensor], t: int) -> tuple[torch.Tensor, bool, bool]:
        """Box i given the previous boxes: (box, used fallback, meets the overlap rule)."""
        globals_ = boxes[: min(i, self.crops[0])]
        box, fb = self._draw(ref, i, globals_, t)
        need = 2 * t if i < self.crops[0] else t
        ok = all(box_area(box_intersection(box, g)) > need for g in globals_)
        return box, fb, ok

    def __call__(self, image) -> dict:
        global _WARNED_SMALL
        img = _to_pil(image)
        W, H = img.size
        if (W < self.sizes[1] or H < self.sizes[1]) and not _WARNED_SMALL:
            log.warning("image of %dx%d px is smaller than the %d-px local crops: crops are upsampled by the resize "
                        "(logged once)", W, H, self.sizes[1])
            _WARNED_SMALL = True
        t = math.floor(self.min_intersection * W * H)
        boxes, out = [], []
        n_fb = n_unsat = 0
        for i, S in enumerate(self.crop_sizes):
            box, fb, ok = self._next(img, i, boxes, t)
            n_fb, n_unsat = n_fb + int(fb), n_unsat + int(not ok)
            boxes.append(box)
            x1, y1, x2, y2 = (int(v) for v in box.tolist())
            crop = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [S, S],
                                   interpolation=T.InterpolationMode.BILINEAR)
            out.append(self._photo(crop))
        boxes_t = torch.stack(boxes)
        gc, all_ = crop_intersection_boxes(boxes_t, self.crop_sizes, self.crops[0])
        return {"crops": out, "boxes": boxes_t.float(), "gc": gc, "all": all_, "n_fallback": n_fb,
                "n_unsatisfied": n_unsat}


class NeCoDataset(Dataset):
    """Wraps any dataset of images (PIL, uint8 arrays, synthetic ``Scene``s or dinokit item dicts with ``image``)
    and applies :class:`NeCoViews`. Bad files (items with ``image=None``) become ``{"error": reason, "id": id}``
    and are dropped (and counted) by :func:`neco_collate`."""

    def __init__(self, base, views: NeCoViews):
        self.base, self.views = base, views

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if isinstance(item, dict):
            if item.get("image") is None:
                return {"error": item.get("error", "unreadable"), "id": item.get("id", str(i))}
            image = item["image"]
        else:
            image = getattr(item, "image", item)
        return self.views(image)


def neco_collate(samples: list[dict]) -> dict:
    """Batch of views: ``crops`` list of K tensors (B, 3, S_k, S_k), ``gc`` (B, 2, K, 4), ``all`` (B, K, 2, 4),
    ``n_fallback``/``n_unsatisfied`` (B,), ``n_bad`` (int, dropped unreadable items), ``bad`` (their ids)."""
    bad = [s["id"] for s in samples if "error" in s]
    good = [s for s in samples if "error" not in s]
    if not good:
        raise ValueError(f"every item of the batch was unreadable: {bad[:5]}")
    K = len(good[0]["crops"])
    return {
        "crops": [torch.stack([s["crops"][k] for s in good]) for k in range(K)],
        "boxes": torch.stack([s["boxes"] for s in good]),
        "gc": torch.stack([s["gc"] for s in good]),
        "all": torch.stack([s["all"] for s in good]),
        "n_fallback": torch.tensor([s["n_fallback"] for s in good]),
        "n_unsatisfied": torch.tensor([s["n_unsatisfied"] for s in good]),
        "n_bad": len(bad),
        "bad": bad,
    }
