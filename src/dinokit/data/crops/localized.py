"""``LocalizedRandomResizedCrop``: random-resized crops constrained to overlap a box by a target aIoU, with the
published geometry and its fixes, and the maIoU a threshold gives. See docs/methods/localisation.md."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...eval.boxes import maiou as mean_aiou

PUBLISHED_MAIOU: dict[float, float] = {0.0: 0.50, 0.1: 0.65, 0.2: 0.72, 0.3: 0.79, 0.4: 0.845, 0.5: 0.89, 0.6: 0.93,
                                       0.7: 0.96, 0.8: 0.98, 0.9: 0.993, 1.0: 0.999}


def maiou_fit(thr: float | np.ndarray) -> float | np.ndarray:
    """The loose fit of the published curve: maIoU = 0.5 + thr^0.4 / 2."""
    return 0.5 + np.power(thr, 0.4) / 2


def thr_from_maiou(m: float) -> float:
    """Inverse of :func:`maiou_fit`: thr = (2 (m - 0.5))^2.5, for 0.5 <= m <= 1 (m > 1 means crop mode ``rrc``)."""
    if not 0.5 <= m <= 1.0:
        raise ValueError(f"maIoU {m} outside [0.5, 1]; above 1 the reference meant plain RandomResizedCrop "
                         "(crop mode 'rrc')")
    return float((2 * (m - 0.5)) ** 2.5)


def validate_box(box: Sequence[float], image_size: tuple[int, int], image_id: object = None,
                 clip: bool = False) -> list[float]:
    """Check ``[x, y, w, h]`` against an (H, W) image: a box exceeding the image by <= 1 px is clipped; w <= 0, h <= 0,
    negative coordinates or a larger excess raise a :class:`~dinokit.errors.BoxError` naming the image and the box.
    ``clip=True`` (``--clip_boxes``) clips any finite box to the image instead; a box with no area left inside the
    image, or a non-finite one, still raises."""
    from ...errors import BoxError

    H, W = image_size
    name = f"image {image_id!r}" if image_id is not None else "the image"
    fix = "fix the box file, or pass --clip_boxes to clip boxes to the image"
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise BoxError(f"box {box!r} of {name} is not [x, y, w, h]", hint="write boxes as [x, y, w, h]") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BoxError(f"box {[x, y, w, h]} of {name} has non-finite values", hint="fix the box file")
    if clip:
        x0, y0 = min(max(x, 0.0), W), min(max(y, 0.0), H)
        x1, y1 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            raise BoxError(f"box {[x, y, w, h]} of {name} ({W}x{H}) has no area inside the image, even clipped",
                           hint="fix the box file")
        return [x0, y0, x1 - x0, y1 - y0]
    if w <= 0 or h <= 0:
        raise BoxError(f"box {[x, y, w, h]} of {name} ({W}x{H}) has zero or negative size", hint=fix)
    if x < 0 or y < 0:
        raise BoxError(f"box {[x, y, w, h]} of {name} ({W}x{H}) has negative coordinates", hint=fix)
    if x + w > W + 1 or y + h > H + 1 or x >= W or y >= H:
        raise BoxError(f"box {[x, y, w, h]} of {name} lies outside the {W}x{H} image by more than 1 px: boxes "
                       "must be in original-image pixels (was the image resized?)", hint=fix)
    return [x, y, min(w, W - x), min(h, H - y)]


def localized_crop_geometry(image_size: tuple[int, int], box: Sequence[float], u: Sequence[float], thr: float,
                            scale: tuple[float, float], ratio: tuple[float, float],
                            rounding: str = "trunc") -> tuple[int, int, int, int, float, float]:
    """§2.2 steps 1-9 for four uniforms ``u``: (top, left, height, width) plus the float (H_c, W_c) of step 6."""
    H, W = image_size
    xo, yo, wo, ho = box
    A_I = W * H
    A_O = max(wo, ho) ** 2
    s_lo, s_hi = max(scale[0], thr * A_O / A_I), scale[1]
    if s_lo > s_hi:
        s_hi = s_lo
    s = s_lo + (s_hi - s_lo) * u[0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    r = math.exp(lr0 + (lr1 - lr0) * u[1])
    side = math.sqrt(A_I) * math.sqrt(s)
    Wc, Hc = (r * side, side) if r > 1 else (side, side / r)
    Hc, Wc = min(Hc, H), min(Wc, W)
    alpha = 1.0 - math.sqrt(thr)
    xr, yr = alpha * (Wc + wo) / 2, alpha * (Hc + ho) / 2
    cx = xo + wo / 2 + (-xr + 2 * xr * u[2])
    cy = yo + ho / 2 + (-yr + 2 * yr * u[3])
    top, left = max(0.0, cy - Hc / 2), max(0.0, cx - Wc / 2)
    hc, wc = Hc, Wc
    if top + hc > H:
        hc = H - top
    if left + wc > W:
        wc = W - left
    if rounding == "outward":
        t, lf = math.floor(top), math.floor(left)
        return t, lf, min(H, math.ceil(top + hc)) - t, min(W, math.ceil(left + wc)) - lf, Hc, Wc
    return int(top), int(left), int(hc), int(wc), Hc, Wc


class LocalizedRandomResizedCrop(nn.Module):
    """RandomResizedCrop around an object box (§2), torchvision-v2 compatible.

    ``t(image, box)`` with a PIL image or tensor (..., H, W) and ``box`` ``[x, y, w, h]`` (list, tensor or v2
    ``BoundingBoxes`` in XYWH) returns ``(crop, box_in_crop)`` (the box in output coordinates, same type as given);
    with ``return_params=True`` also ``(top, left, height, width)``. ``thr`` = 0 only requires overlap, ``thr`` = 1
    keeps the whole box. ``rng``: a seeded ``random.Random`` or ``torch.Generator`` (default: torch's global RNG).
    ``retries`` counts redraws of zero-size crops, ``fallbacks`` the calls that used the centred fallback.
    """

    def __init__(self, size: int | Sequence[int] = 224, thr: float = 1.0, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation=None, antialias: bool = True,
                 max_attempts: int = 10, rounding: str = "trunc", rng: random.Random | torch.Generator | None = None,
                 return_params: bool = False):
        super().__init__()
        from torchvision.transforms.v2 import InterpolationMode

        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"thr={thr} must be in [0, 1] (use crop mode 'rrc' for plain RandomResizedCrop)")
        if not (0 < scale[0] and scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"scale={scale} and ratio={ratio} must be positive, increasing intervals")
        if rounding not in ("trunc", "outward"):
            raise ValueError(f"rounding={rounding!r}; choose 'trunc' or 'outward'")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be >= 1")
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.thr, self.scale, self.ratio = float(thr), tuple(scale), tuple(ratio)
        self.interpolation = interpolation if interpolation is not None else InterpolationMode.BILINEAR
        self.antialias, self.max_attempts, self.rounding = antialias, max_attempts, rounding
        self.rng, self.return_params = rng, return_params
        self.retries = 0
        self.fallbacks = 0

    def _uniforms(self) -> list[float]:
        if isinstance(self.rng, random.Random):
            return [self.rng.random() for _ in range(4)]
        return torch.rand(4, dtype=torch.float64, generator=self.rng).tolist()

    def get_params(self, image_size: tuple[int, int], box: Sequence[float],
                   image_id: object = None) -> tuple[int, int, int, int]:
        """(top, left, height, width) of one crop for an (H, W) image and ``[x, y, w, h]`` box (§2.2)."""
        H, W = int(image_size[0]), int(image_size[1])
        b = validate_box(box, (H, W), image_id)
        Hc = Wc = 0.0
        for attempt in range(self.max_attempts):
            t, lf, h, w, Hc, Wc = localized_crop_geometry((H, W), b, self._uniforms(), self.thr, self.scale,
                                                          self.ratio, self.rounding)
            if h >= 1 and w >= 1:
                return t, lf, h, w
            if attempt + 1 < self.max_attempts:
                self.retries += 1
        self.fallbacks += 1
        h, w = max(1, min(H, int(Hc))), max(1, min(W, int(Wc)))
        top = min(max(0, int(b[1] + b[3] / 2 - h / 2)), H - h)
        left = min(max(0, int(b[0] + b[2] / 2 - w / 2)), W - w)
        return top, left, h, w

    def forward(self, image, box=None, image_id: object = None):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        if box is None:
            raise ValueError("LocalizedRandomResizedCrop needs a box per sample: t(image, [x, y, w, h]); for images "
                             "without a box use crop mode 'rrc' or missing_box='rrc'")
        H, W = TF.get_size(image)
        is_bb = isinstance(box, tv_tensors.BoundingBoxes)
        raw = box
        if is_bb:
            bx = TF.convert_bounding_box_format(box, new_format=tv_tensors.BoundingBoxFormat.XYWH)
            raw = bx.reshape(-1, 4)[0].tolist()
        elif isinstance(box, torch.Tensor):
            raw = box.reshape(-1)[:4].tolist()
        top, left, h, w = self.get_params((H, W), raw, image_id)
        out = TF.resized_crop(image, top, left, h, w, self.size, interpolation=self.interpolation,
                              antialias=self.antialias)
        src = box if is_bb else tv_tensors.BoundingBoxes(torch.tensor([validate_box(raw, (H, W), image_id)]),
                                                         format="XYWH", canvas_size=(H, W))
        moved = TF.resized_crop(src, top, left, h, w, self.size)
        moved = TF.clamp_bounding_boxes(moved)
        if not is_bb:
            moved = moved.reshape(-1)[:4].tolist() if not isinstance(box, torch.Tensor) else moved.as_subclass(
                torch.Tensor).reshape(box.shape)
        return (out, moved, (top, left, h, w)) if self.return_params else (out, moved)

    def extra_repr(self) -> str:
        return f"size={self.size}, thr={self.thr}, scale={self.scale}, ratio={self.ratio}, rounding={self.rounding}"


def localized_crop_maiou(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], thr: float, seed: int = 0,
                         scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> float:
    """The maIoU that ``thr`` gives: mean over images of aIoU(crop, box), one ``LocalizedRandomResizedCrop`` crop per
    image (the metric itself is :func:`dinokit.eval.boxes.maiou`)."""
    t = LocalizedRandomResizedCrop(thr=thr, scale=scale, ratio=ratio, rng=random.Random(seed))
    crops = []
    for b, s in zip(boxes, sizes):
        top, left, h, w = t.get_params(s, b)
        crops.append([left, top, w, h])
    return mean_aiou(np.asarray(crops, np.float64), [np.asarray([b], np.float64) for b in boxes], fmt="xywh")


def synthetic_boxes(n: int, size: tuple[int, int] = (375, 500), seed: int = 0) -> np.ndarray:
    """§2.3's synthetic set: box sides floor(U(0.25, 0.9) side) at a uniform integer position; (n, 4) xywh."""
    H, W = size
    rng = np.random.default_rng(seed)
    w = np.floor(rng.uniform(0.25, 0.9, n) * W)
    h = np.floor(rng.uniform(0.25, 0.9, n) * H)
    x = np.floor(rng.uniform(0, 1, n) * (W - w + 1))
    y = np.floor(rng.uniform(0, 1, n) * (H - h + 1))
    return np.stack([x, y, w, h], 1)
