"""Pseudo ground-truth boxes from CLS attention: score maps, masks, boxes (batched, bucketed by input size), and
the box JSON files. Boxes are ``[x, y, w, h]`` pixels of the original image. See docs/methods/localisation.md."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...backbones.extract import as_uint8_chw  # noqa: F401  (part of this module's API)
from ...io import atomic_write_text
from ...viz.maps import mass_threshold_mask

FIXED_THRESHOLD: float = math.log1p(76.0 / 255.0 * math.expm1(4.0)) / 4.0
VALUES = ("logit", "prob")
RULES = ("fixed", "mass")
BOX_RULES = ("centroid", "extent")

# ---------------------------------------------------------------------------------------------------------------
# 1. Score maps, masks, pseudo-boxes
# ---------------------------------------------------------------------------------------------------------------


def input_size(H: int, W: int, patch: int, size: str = "native") -> tuple[int, int]:
    """§1.1: the backbone input (H', W') = max(p, floor(H s / p) p) for ``size="native"`` (s = 1) or ``"short:S"``."""
    if size == "native":
        s = 1.0
    elif size.startswith("short:"):
        try:
            s = int(size.split(":", 1)[1]) / min(H, W)
        except ValueError as err:
            raise ValueError(f"size={size!r}: expected 'native' or 'short:S' with an integer S") from err
    else:
        raise ValueError(f"size={size!r}: expected 'native' or 'short:S' (e.g. 'short:224')")
    return max(patch, int(H * s // patch) * patch), max(patch, int(W * s // patch) * patch)


def attention_values(attn: torch.Tensor, values: str = "logit") -> torch.Tensor:
    """(B, heads, h, w) CLS attention -> per-head renormalised probabilities (``"prob"``) or their logs (``"logit"``,
    equal to the pre-softmax q.k/sqrt(d) up to one constant per (image, head))."""
    if values not in VALUES:
        raise ValueError(f"values={values!r}; choose one of {VALUES}")
    a = attn.double()  # maps are small: fp64 keeps constant maps exactly constant through filter and upsampling
    a = a / a.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return a.clamp_min(1e-30).log() if values == "logit" else a


def score_from_values(v: torch.Tensor, outlier: bool = True) -> torch.Tensor:
    """§1.2 steps 2-3: (B, heads, h, w) values -> (B, h, w). ``outlier`` sets each head's largest cell (first in
    row-major order on ties) to that head's mean (computed before the replacement), then heads are averaged."""
    v = to_float(v)
    if outlier:
        B, nh, h, w = v.shape
        flat = v.reshape(B, nh, h * w).clone()
        idx = flat.argmax(-1, keepdim=True)  # torch returns the first maximal index
        flat.scatter_(-1, idx, flat.mean(-1, keepdim=True))
        v = flat.reshape(B, nh, h, w)
    return v.mean(1)


def score_map(attn: torch.Tensor, values: str = "logit", outlier: bool = True) -> torch.Tensor:
    """§1.2 steps 1-3: (B, heads, h, w) CLS attention -> (B, h, w) head-averaged score map."""
    return score_from_values(attention_values(attn, values), outlier)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def odd_kernel(h: int, w: int) -> tuple[int, int]:
    """§1.2 step 4: (kh, kw) = max(3, floor(0.2 h)), max(3, floor(0.2 w)), each rounded up to odd."""
    kh, kw = max(3, int(0.2 * h)), max(3, int(0.2 * w))
    return kh + 1 - kh % 2, kw + 1 - kw % 2


def _pad_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of numpy "symmetric" padding (mirror including the edge); replicate when pad > n."""
    i = torch.arange(-pad, n + pad, device=device)
    if pad > n:
        return i.clamp(0, n - 1)
    return torch.where(i < 0, -i - 1, torch.where(i >= n, 2 * n - i - 1, i))


def box_filter(m: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, h, w): the mean over a (kh, kw) window (odd sides), symmetric padding."""
    kh, kw = kernel
    if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1:
        raise ValueError(f"box filter kernel {kernel} must have odd positive sides")
    B, h, w = m.shape
    x = to_float(m)[:, _pad_index(h, kh // 2, m.device)][:, :, _pad_index(w, kw // 2, m.device)]
    return F.avg_pool2d(x[:, None], (kh, kw), stride=1)[:, 0]


def upsample_minmax(m: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """§1.2 step 5: (h, w) map -> ((H, W) bicubic, align_corners=False, min-max to [0, 1]; degenerate flag).

    Interpolated in fp64 so that a constant map stays constant to ~1e-16 (fp32 rounding alone exceeds the 1e-12
    degeneracy test); returned as fp32."""
    up = F.interpolate(m.double()[None, None], size=tuple(size), mode="bicubic", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    if float(hi - lo) < 1e-12:
        return torch.zeros_like(up, dtype=torch.float32), True
    return ((up - lo) / (hi - lo)).float(), False


def cell_bounds(n: int, cells: int) -> np.ndarray:
    """Pixel boundaries round(i n / cells), i = 0..cells (round half up), as an int array of length cells + 1."""
    return np.floor(np.arange(cells + 1) * n / cells + 0.5).astype(np.int64)


def cells_to_pixels(mask: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) cell mask -> (H, W) pixel mask: cell (i, j) covers rows [iH/h, (i+1)H/h), columns [jW/w, (j+1)W/w),
    rounded."""
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    H, W = size
    rows = np.searchsorted(cell_bounds(H, m.shape[0]), np.arange(H), side="right") - 1
    cols = np.searchsorted(cell_bounds(W, m.shape[1]), np.arange(W), side="right") - 1
    return m[np.clip(rows, 0, m.shape[0] - 1)][:, np.clip(cols, 0, m.shape[1] - 1)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (the mask itself when empty)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    counts = np.bincount(lab.ravel())[1:]
    return lab == int(np.argmax(counts)) + 1


def integer_box(x: float, y: float, w: float, h: float, size: tuple[int, int]) -> list[int]:
    """§1.4: x0 = floor(x + 1/2), x1 = floor(x + w + 1/2) (likewise y), clipped; a zero side grows to 1 inside."""
    H, W = size

    def side(a: float, length: float, n: int) -> tuple[int, int]:
        a0 = min(max(math.floor(a + 0.5), 0), n)
        a1 = min(max(math.floor(a + length + 0.5), 0), n)
        if a1 <= a0:
            a0 = min(a0, n - 1)
            a1 = a0 + 1
        return a0, a1

    x0, x1 = side(x, w, W)
    y0, y1 = side(y, h, H)
    return [x0, y0, x1 - x0, y1 - y0]


def mask_to_box(mask: np.ndarray, box: str = "centroid") -> list[int] | None:
    """§1.4: (H, W) boolean mask -> integer ``[x, y, w, h]``, or None for an empty mask.

    ``centroid``: centred on the mean pixel centre, w / h = the numbers of occupied columns / rows.
    ``extent``: the tight box.
    """
    if box not in BOX_RULES:
        raise ValueError(f"box={box!r}; choose one of {BOX_RULES}")
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    if box == "extent":
        x0, y0 = int(xs.min()), int(ys.min())
        return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    cx, cy = float(np.mean(xs + 0.5)), float(np.mean(ys + 0.5))
    w, h = int(mask.any(0).sum()), int(mask.any(1).sum())
    return integer_box(cx - w / 2, cy - h / 2, w, h, mask.shape)


@dataclass
class BoxConfig:
    """Options of §1 (defaults = the reference rule)."""

    block: int = -1
    size: str = "native"
    autocontrast: bool = True
    values: str = "logit"
    outlier: bool = True
    rule: str = "fixed"
    threshold: float = FIXED_THRESHOLD
    tau: float = 0.6
    box: str = "centroid"
    largest_component: bool = False
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.values not in VALUES:
            raise ValueError(f"values={self.values!r}; choose one of {VALUES}")
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r}; choose one of {RULES}")
        if self.box not in BOX_RULES:
            raise ValueError(f"box={self.box!r}; choose one of {BOX_RULES}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} must be in (0, 1]")


def pseudo_mask(attn: torch.Tensor, size: tuple[int, int], cfg: BoxConfig) -> tuple[np.ndarray, bool]:
    """One image's (heads, h, w) attention -> ((H, W) boolean mask at original size, degenerate flag)."""
    if cfg.rule == "mass":
        prob = attention_values(attn[None], "prob").mean(1)[0]
        cells = mass_threshold_mask(prob, cfg.tau)
        mask = cells_to_pixels(cells, size)
        degenerate = False
    else:
        s = score_map(attn[None], cfg.values, cfg.outlier)
        s = box_filter(s, odd_kernel(*s.shape[-2:]))[0]
        m, degenerate = upsample_minmax(s, size)
        mask = (m >= cfg.threshold).cpu().numpy() if not degenerate else np.zeros(size, bool)
    if cfg.largest_component and mask.any():
        mask = largest_component(mask)
    return mask, degenerate


def boxes_from_attention(attn: torch.Tensor, sizes: Sequence[tuple[int, int]],
                         cfg: BoxConfig | None = None) -> tuple[list[list[int]], list[bool]]:
    """(B, heads, h, w) attention + original sizes (H, W) -> boxes ``[x, y, w, h]`` in original pixels, and a flag per
    image that is True where the map was degenerate or the mask empty (those get the whole-image box)."""
    cfg = cfg or BoxConfig()
    if attn.ndim != 4 or attn.shape[0] != len(sizes):
        raise ValueError(f"attention must be (B, heads, h, w) with B = len(sizes) = {len(sizes)}, "
                         f"got {tuple(attn.shape)}")
    out, flags = [], []
    for a, (H, W) in zip(attn, sizes):
        mask, degenerate = pseudo_mask(a, (int(H), int(W)), cfg)
        b = None if degenerate else mask_to_box(mask, cfg.box)
        flags.append(b is None)
        out.append(b if b is not None else [0, 0, int(W), int(H)])
    return out, flags


def image_hw(image) -> tuple[int, int]:
    """(H, W) of a PIL image, (H, W, 3) array or (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:]) if image.shape[0] == 3 else tuple(image.shape[:2])
    if isinstance(image, np.ndarray):
        return tuple(image.shape[:2])
    return image.size[1], image.size[0]


def prepare_input(image, patch: int, cfg: BoxConfig) -> torch.Tensor:
    """§1.1: optional autocontrast, resize (not crop) to the (H', W') rule; (3, H', W') float in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    x = as_uint8_chw(image)
    if cfg.autocontrast:
        x = TF.autocontrast(x)
    H, W = x.shape[-2:]
    Hp, Wp = input_size(H, W, patch, cfg.size)
    if (Hp, Wp) != (H, W):
        x = TF.resize(x, [Hp, Wp], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return x.float().div_(255.0)


@torch.no_grad()
def pseudo_boxes(backbone, images: Sequence, ids: Sequence[str], cfg: BoxConfig | None = None,
                 device: str | torch.device | None = None) -> tuple[dict[str, list[int]], list[str]]:
    """Pseudo ground-truth boxes of ``images`` (PIL / uint8 arrays of any size) with one backbone forward per bucket
    batch of equal input size. Returns ({id: [x, y, w, h]} in original pixels, ids whose box is the whole image
    because the map was degenerate or the mask empty). Results do not depend on the batch composition."""
    cfg = cfg or BoxConfig()
    if len(images) != len(ids):
        raise ValueError(f"{len(images)} images but {len(ids)} ids")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    p = backbone.patch_size
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    prepared = [prepare_input(im, p, cfg) for im in images]
    sizes = [image_hw(im) for im in images]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(prepared):
        buckets.setdefault(tuple(x.shape[-2:]), []).append(i)
    boxes: dict[str, list[int]] = {}
    degenerate: list[str] = []
    for idx in buckets.values():
        for s in range(0, len(idx), cfg.batch_size):
            chunk = idx[s:s + cfg.batch_size]
            x = (torch.stack([prepared[i] for i in chunk]).to(device) - mean) / std
            attn = backbone.attention(x, block=cfg.block).cls.float().cpu()
            bx, flags = boxes_from_attention(attn, [sizes[i] for i in chunk], cfg)
            for i, b, f in zip(chunk, bx, flags):
                boxes[str(ids[i])] = b
                if f:
                    degenerate.append(str(ids[i]))
    if degenerate:
        warnings.warn(f"{len(degenerate)} image(s) had a degenerate attention map or an empty mask and got the "
                      f"whole-image box: {degenerate[:5]}{' ...' if len(degenerate) > 5 else ''}", stacklevel=2)
    return {str(k): boxes[str(k)] for k in ids}, degenerate


def _id_key(k: str) -> tuple:
    return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))


def write_box_json(path: str | Path, boxes: dict[str, Sequence[float]], meta: dict | None = None) -> Path:
    """Write ``{"<id>": [x, y, w, h]}`` (integers, ids sorted numerically) atomically, and ``<name>.meta.json``."""
    from ...errors import BoxError, strict_json

    path = Path(path)
    for k, b in boxes.items():
        if not all(math.isfinite(float(v)) for v in b):
            raise BoxError(f"box {list(b)} of image {k!r} is not finite; nothing was written to {path}",
                           hint="this is a bug in the box source: report it with the image")
    payload = {str(k): [int(v) for v in boxes[k]] for k in sorted(boxes, key=_id_key)}
    atomic_write_text(path, json.dumps(payload, indent=0, allow_nan=False))
    if meta is not None:
        atomic_write_text(path.with_suffix(".meta.json"), strict_json(meta))
    return path


def read_box_json(path: str | Path, expected_ids: Sequence[str] | None = None, allow_extra: bool = False,
                  sizes: Mapping[str, tuple[int, int]] | None = None, clip: bool = False) -> dict[str, list[float]]:
    """Read a pseudo-box JSON; with ``expected_ids``, missing (or, unless ``allow_extra``, extra) ids raise.

    With ``sizes`` ({id: (H, W)}), every box of those ids is validated against its image
    (:func:`~dinokit.data.crops.localized.validate_box`): an out-of-image, zero-size, negative or non-finite box raises
    a ``BoxError`` naming the image id and the box; ``clip=True`` clips boxes to the image instead.
    """
    from ...errors import BoxError, DataError, MissingFileError
    from .localized import validate_box

    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant(path))
    except FileNotFoundError as err:
        raise MissingFileError(f"box file {path} does not exist; create it with `dinokit boxes`") from err
    except json.JSONDecodeError as err:
        raise DataError(f"box file {path} is not valid JSON: {err}", hint="regenerate it with `dinokit boxes`") from err
    if not isinstance(data, dict):
        raise DataError(f"box file {path} must map image ids to [x, y, w, h], got {type(data).__name__}")
    for k, v in data.items():
        if not (isinstance(v, list | tuple) and len(v) == 4) or \
                not all(isinstance(c, int | float) and not isinstance(c, bool) for c in v):
            raise BoxError(f"box file {path}: entry {k!r} is {v!r}, expected [x, y, w, h] numbers",
                           hint="write every box as [x, y, w, h] in image pixels")
    if expected_ids is not None:
        exp = {str(i) for i in expected_ids}
        data = _apply_aliases(path, data, exp)
        missing = sorted(exp - data.keys(), key=_id_key)
        extra = sorted(data.keys() - exp, key=_id_key)
        if missing:
            raise DataError(f"box file {path} lacks {len(missing)} image(s) of the dataset (first: {missing[:5]})",
                            hint="regenerate it with `dinokit boxes` on this dataset and split (`dinokit classify "
                                 "fit` also accepts --missing_box rrc: RandomResizedCrop where a box is missing)")
        if extra and not allow_extra:
            raise DataError(f"box file {path} has {len(extra)} id(s) not in the dataset (first: {extra[:5]}): "
                            "it was made for another dataset or split", hint="regenerate it with `dinokit boxes`")
    out = {str(k): [float(x) for x in v] for k, v in data.items()}
    if sizes is not None:
        for k, hw in sizes.items():
            if str(k) in out:
                try:
                    out[str(k)] = validate_box(out[str(k)], hw, k, clip=clip)
                except BoxError as err:
                    raise BoxError(f"box file {path}: {err}", hint=err.hint) from err
    return out


def _apply_aliases(path: Path, data: dict, expected: set[str]) -> dict:
    """Re-key ``data`` to the expected id scheme through the ``id_aliases`` ({numeric CUB id: dataset id}) that
    ``dinokit boxes`` records in ``<name>.meta.json``; unchanged when the keys already match or there is no alias."""
    if not data.keys() - expected:
        return data
    side = path.with_suffix(".meta.json")
    try:
        aliases = json.loads(side.read_text()).get("id_aliases") or {}
    except (OSError, ValueError, AttributeError):
        return data
    both = {**aliases, **{v: k for k, v in aliases.items()}}
    return {(k if k in expected else both.get(k, k)): v for k, v in data.items()}


def _reject_constant(path: Path):
    def reject(name: str):
        from ...errors import BoxError

        raise BoxError(f"box file {path} holds a bare {name} token, which is not valid JSON (a NaN or infinite box)",
                       hint="regenerate it with `dinokit boxes`, or fix the boxes by hand")
    return reject
