"""Attention-guided localisation: pseudo ground-truth boxes, ``LocalizedRandomResizedCrop`` and density crops.

Spec: ``shared/spec/crops.md``. Boxes are ``[x, y, w, h]`` in pixels of the **original** image; a crop is
``(top, left, height, width)``. Attention maps are ``AttentionMaps.cls`` (B, heads, h, w) of a named block; all map
arithmetic is fp32 (fp64 for the sampler's cumulative sums).

Sections: (1) score maps, masks and pseudo-boxes (batched over the backbone, bucketed by input size);
(2) ``LocalizedRandomResizedCrop`` with the published geometry and its fixes, plus maIoU;
(3) attention-density crops: the density map, a vectorised sampler, the on-device batched pipeline
(``OnlineDensityCrops``) and the precomputed patch-resolution cache (``DensityCache``).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# exp(4m) >= 1 + (76/255)(e^4 - 1)  <=>  m >= this: the reference's min-max/softmax(4m)/min-max/uint8/>75 chain
FIXED_THRESHOLD: float = math.log1p(76.0 / 255.0 * math.expm1(4.0)) / 4.0
VALUES = ("logit", "prob")
RULES = ("fixed", "mass")
BOX_RULES = ("centroid", "extent")
PLACEMENTS = ("restrict", "shift")
N_UNIFORMS = 24  # 10 x (scale, log-ratio), cell, x, y, flip

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
    v = _f(v)
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


def _f(x: torch.Tensor) -> torch.Tensor:
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
    x = _f(m)[:, _pad_index(h, kh // 2, m.device)][:, :, _pad_index(w, kw // 2, m.device)]
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
        from ..viz import mass_threshold_mask

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


def as_uint8_chw(image) -> torch.Tensor:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        t = image if image.shape[0] == 3 else image.permute(2, 0, 1)
        return t.to(torch.uint8)
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)


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
    from ..io import atomic_write_text

    path = Path(path)
    payload = {str(k): [int(v) for v in boxes[k]] for k in sorted(boxes, key=_id_key)}
    atomic_write_text(path, json.dumps(payload, indent=0))
    if meta is not None:
        atomic_write_text(path.with_suffix(".meta.json"), json.dumps(meta, indent=1, default=str))
    return path


def read_box_json(path: str | Path, expected_ids: Sequence[str] | None = None,
                  allow_extra: bool = False) -> dict[str, list[float]]:
    """Read a pseudo-box JSON; with ``expected_ids``, missing (or, unless ``allow_extra``, extra) ids raise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"box file {path} does not exist; create it with `dinokit boxes`") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"box file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"box file {path} must map image ids to [x, y, w, h], got {type(data).__name__}")
    for k, v in data.items():
        if not (isinstance(v, list | tuple) and len(v) == 4):
            raise ValueError(f"box file {path}: entry {k!r} is {v!r}, expected [x, y, w, h]")
    if expected_ids is not None:
        exp = {str(i) for i in expected_ids}
        missing = sorted(exp - data.keys(), key=_id_key)
        extra = sorted(data.keys() - exp, key=_id_key)
        if missing:
            raise ValueError(f"box file {path} lacks {len(missing)} image(s) of the dataset (first: {missing[:5]}); "
                             "regenerate it with `dinokit boxes` on this dataset, or use missing_box='rrc'")
        if extra and not allow_extra:
            raise ValueError(f"box file {path} has {len(extra)} id(s) not in the dataset (first: {extra[:5]}): "
                             "it was made for another dataset or split")
    return {str(k): [float(x) for x in v] for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------------
# 1b. SAM alternative (extra ``dinokit[sam]``): masks from a local checkpoint, one mask per image
# ---------------------------------------------------------------------------------------------------------------

SAM_SELECT = ("attention", "ncm", "largest", "oracle")


def mask_extents(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) boolean masks -> (N, 4) tight ``[x, y, w, h]`` (zeros for an empty mask)."""
    out = np.zeros((len(masks), 4), np.int64)
    for n, m in enumerate(np.asarray(masks, bool)):
        b = mask_to_box(m, "extent")
        if b is not None:
            out[n] = b
    return out


def square_crop_box(box: Sequence[float], size: tuple[int, int]) -> list[int]:
    """The square of side max(w, h) (at most min(H, W)) centred on ``box`` and shifted inside the (H, W) image, as
    integer ``[x, y, side, side]`` (the ``ncm`` feature crop of §1.6)."""
    H, W = size
    x, y, w, h = box
    side = int(min(max(w, h), H, W))
    side = max(side, 1)
    x0 = min(max(int(math.floor(x + w / 2 - side / 2 + 0.5)), 0), W - side)
    y0 = min(max(int(math.floor(y + h / 2 - side / 2 + 0.5)), 0), H - side)
    return [x0, y0, side, side]


def select_sam_mask(masks: np.ndarray, select: str = "attention", attention_mask: np.ndarray | None = None,
                    features: torch.Tensor | None = None, prototype: torch.Tensor | None = None,
                    gt_box: Sequence[float] | None = None) -> int:
    """Index of the chosen mask among (N, H, W) boolean ``masks`` (-1 when there is none to choose).

    ``attention``: highest IoU with ``attention_mask`` (the tau = 0.6 mass mask at original size); ``ncm``: highest
    cosine similarity of ``features`` (N, D) (classifier features of each mask's square crop) to ``prototype`` (D,),
    the mean L2-normalised feature of the image's ground-truth class; ``largest``: the largest mask covering < 95 % of
    the image; ``oracle``: the best box IoU with ``gt_box`` (analysis only).
    """
    if select not in SAM_SELECT:
        raise ValueError(f"select={select!r}; choose one of {SAM_SELECT}")
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or len(masks) == 0:
        return -1
    if select == "attention":
        if attention_mask is None:
            raise ValueError("select='attention' needs the attention mass mask (attention_mask)")
        am = np.asarray(attention_mask, bool)
        inter = (masks & am[None]).sum((1, 2))
        union = (masks | am[None]).sum((1, 2))
        return int(np.argmax(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))
    if select == "ncm":
        if features is None or prototype is None:
            raise ValueError("select='ncm' needs per-mask features (N, D) and the gt-class prototype (D,)")
        f = F.normalize(torch.as_tensor(features).float(), dim=-1)
        p = F.normalize(torch.as_tensor(prototype).float().reshape(-1), dim=0)
        return int((f @ p).argmax())
    if select == "largest":
        area = masks.sum((1, 2))
        ok = area < 0.95 * masks.shape[1] * masks.shape[2]
        return int(np.argmax(np.where(ok, area, -1))) if ok.any() else -1
    if gt_box is None:
        raise ValueError("select='oracle' needs the ground-truth box")
    from ..eval.boxes import box_iou

    return int(np.argmax(box_iou(mask_extents(masks).astype(np.float64), np.asarray([gt_box], np.float64),
                                 fmt="xywh")[:, 0]))


def sam_mask_generator(checkpoint: str | Path, model_type: str = "vit_h", device: str = "cpu",
                       points_per_side: int = 10, stability_score_thresh: float = 0.5):
    """A ``segment_anything.SamAutomaticMaskGenerator`` from a **local** checkpoint (nothing is downloaded)."""
    try:
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    except ImportError as err:
        raise ImportError("SAM boxes need the optional extra: pip install 'dinokit[sam]'") from err
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"SAM checkpoint {ckpt} not found: download it yourself (e.g. sam_vit_h_4b8939.pth) "
                                "and pass its local path; dinokit never downloads it")
    sam = sam_model_registry[model_type](checkpoint=str(ckpt)).to(device)
    return SamAutomaticMaskGenerator(sam, points_per_side=points_per_side,
                                     stability_score_thresh=stability_score_thresh)


def sam_masks(image: np.ndarray, generator, fallback_generator=None, cache: str | Path | None = None) -> dict:
    """SAM masks of one (H, W, 3) uint8 image as arrays (``segmentation`` (N, H, W) bool, ``area``, ``bbox``,
    ``predicted_iou``, ``stability_score``); a second generator (points 3, stability 0.3) runs when the first finds
    nothing. With ``cache`` (an ``.npz`` path), the result is read from / written to it."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    found = generator.generate(image)
    if not found and fallback_generator is not None:
        found = fallback_generator.generate(image)
    H, W = image.shape[:2]
    out = {"segmentation": np.stack([m["segmentation"] for m in found]) if found else np.zeros((0, H, W), bool),
           "area": np.asarray([m["area"] for m in found], np.int64),
           "bbox": np.asarray([m["bbox"] for m in found], np.float64).reshape(-1, 4),
           "predicted_iou": np.asarray([m["predicted_iou"] for m in found], np.float64),
           "stability_score": np.asarray([m["stability_score"] for m in found], np.float64)}
    if cache is not None:
        import io as _io

        from ..io import atomic_write_bytes

        buf = _io.BytesIO()
        np.savez_compressed(buf, **out)
        atomic_write_bytes(cache, buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. LocalizedRandomResizedCrop
# ---------------------------------------------------------------------------------------------------------------

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


def validate_box(box: Sequence[float], image_size: tuple[int, int], image_id: object = None) -> list[float]:
    """Check ``[x, y, w, h]`` against an (H, W) image: a box exceeding the image by <= 1 px is clipped; w <= 0, h <= 0,
    negative coordinates or a larger excess raise a ValueError naming the image."""
    H, W = image_size
    name = f"image {image_id!r}" if image_id is not None else "the image"
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"box {box!r} of {name} is not [x, y, w, h]") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"box {[x, y, w, h]} of {name} has non-finite values")
    if w <= 0 or h <= 0:
        raise ValueError(f"box {[x, y, w, h]} of {name} ({W}x{H}) has zero or negative size; fix the box file")
    if x < 0 or y < 0:
        raise ValueError(f"box {[x, y, w, h]} of {name} ({W}x{H}) has negative coordinates; fix the box file")
    if x + w > W + 1 or y + h > H + 1 or x >= W or y >= H:
        raise ValueError(f"box {[x, y, w, h]} of {name} lies outside the {W}x{H} image by more than 1 px: boxes "
                         "must be in original-image pixels (was the image resized?)")
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


def maiou(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], thr: float, seed: int = 0,
          scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> float:
    """maIoU: mean over images of aIoU(crop, box) with one ``LocalizedRandomResizedCrop`` crop per image."""
    from ..eval.boxes import maiou as mean_aiou

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


# ---------------------------------------------------------------------------------------------------------------
# 3. Attention-density crops
# ---------------------------------------------------------------------------------------------------------------


def density_from_score(x: torch.Tensor, k: int = 5, minmax: bool = False,
                       temperature: float | None = None) -> torch.Tensor:
    """§3.1 steps 2-4 on a (B, h, w) score map: k x k mean (symmetric padding), optional min-max, softmax(x / T) over
    the cells (T = 0.4, or 0.1 with min-max). Returns P (B, h, w), P >= 0, sum 1."""
    T = temperature if temperature is not None else (0.1 if minmax else 0.4)
    if T <= 0:
        raise ValueError(f"temperature={T} must be positive")
    x = box_filter(x, (k, k)) if k > 1 else _f(x)
    if minmax:
        lo = x.amin((-2, -1), keepdim=True)
        hi = x.amax((-2, -1), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    B, h, w = x.shape
    return (x.reshape(B, -1) / T).softmax(-1).reshape(B, h, w)


def density_map(attn: torch.Tensor, k: int = 5, minmax: bool = False, temperature: float | None = None,
                values: str = "logit", outlier: bool = True) -> torch.Tensor:
    """§3.1: (B, heads, h, w) CLS attention -> density P (B, h, w)."""
    return density_from_score(score_map(attn, values, outlier), k, minmax, temperature)


def density_uniforms(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The (B, 24) float64 random rows of the sampler, from one draw of a (seeded) CPU generator."""
    return torch.rand(batch, N_UNIFORMS, dtype=torch.float64, generator=generator)


def crop_shapes(u: torch.Tensor, sizes: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop size rule, vectorised: (B, 24) uniforms and (B, 2) (H, W) -> (h, w) float64."""
    H, W = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0:20:2]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lr0 + (lr1 - lr0) * u[:, 1:20:2])
    area = s * H * W
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.double().argmax(1, keepdim=True)
    wf, hf = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    Hs, Ws = H[:, 0], W[:, 0]
    in_ratio = Ws / Hs
    cw = torch.where(in_ratio < ratio[0], Ws, torch.where(in_ratio > ratio[1], torch.round(Hs * ratio[1]), Ws))
    ch = torch.where(in_ratio < ratio[0], torch.round(Ws / ratio[0]), Hs)
    any_ok = ok.any(1)
    return torch.where(any_ok, hf, ch), torch.where(any_ok, wf, cw)


def _overlap(n_cells: int, length: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(B, n) fraction of each cell [j L/n, (j+1) L/n) inside [lo, hi]; a point interval gives 1 to its (lower) cell."""
    j = torch.arange(n_cells, dtype=torch.float64, device=length.device)
    cw = (length / n_cells)[:, None]
    c0, c1 = j[None] * cw, (j[None] + 1) * cw
    frac = (torch.minimum(c1, hi[:, None]) - torch.maximum(c0, lo[:, None])).clamp_min(0) / cw
    point = (hi - lo) <= 0
    pj = (torch.ceil(lo / cw[:, 0]) - 1).clamp(0, n_cells - 1).long()
    onehot = F.one_hot(pj, n_cells).double()
    return torch.where(point[:, None], onehot, frac)


def sample_density_crops(P: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor,
                         scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                         placement: str = "restrict") -> dict:
    """§3.2, vectorised: density P (B, h, w), image sizes (B, 2) = (H, W), uniforms (B, 24) -> dict with ``crops``
    (B, 4) float64 (top, left, height, width) in continuous pixels, ``flip`` (B,) bool, ``cell`` (B,) int64 (the
    sampled cell, row-major) and ``fallback`` (B,) bool (Sigma q < 1e-30: the centre nearest the argmax cell)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; choose one of {PLACEMENTS}")
    B, gh, gw = P.shape
    dev = P.device
    u = u.to(dev, torch.float64)
    sizes = sizes.to(dev, torch.float64)
    H, W = sizes[:, 0], sizes[:, 1]
    ch, cw = crop_shapes(u, sizes, scale, ratio)
    Xlo, Xhi, Ylo, Yhi = cw / 2, W - cw / 2, ch / 2, H - ch / 2
    Pd = P.to(torch.float64).reshape(B, gh, gw)
    if placement == "restrict":
        ovx, ovy = _overlap(gw, W, Xlo, Xhi), _overlap(gh, H, Ylo, Yhi)
    else:
        ovx = torch.ones(B, gw, dtype=torch.float64, device=dev)
        ovy = torch.ones(B, gh, dtype=torch.float64, device=dev)
    q = (Pd * ovy[:, :, None] * ovx[:, None, :]).reshape(B, -1)
    total = q.sum(1)
    cdf = q.cumsum(1)
    cell = torch.searchsorted(cdf, (u[:, 20] * total)[:, None], right=True)[:, 0].clamp(0, gh * gw - 1)
    fallback = total < 1e-30
    cell = torch.where(fallback, Pd.reshape(B, -1).argmax(1), cell)
    i, j = cell // gw, cell % gw
    cx0, cx1 = j * W / gw, (j + 1) * W / gw
    cy0, cy1 = i * H / gh, (i + 1) * H / gh
    if placement == "restrict":
        x0, x1 = torch.maximum(cx0, Xlo), torch.minimum(cx1, Xhi)
        y0, y1 = torch.maximum(cy0, Ylo), torch.minimum(cy1, Yhi)
        x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    else:
        x0, x1, y0, y1 = cx0, cx1, cy0, cy1
    x = x0 + (x1 - x0) * u[:, 21]
    y = y0 + (y1 - y0) * u[:, 22]
    near_x = ((cx0 + cx1) / 2).clamp(min=Xlo, max=Xhi)
    near_y = ((cy0 + cy1) / 2).clamp(min=Ylo, max=Yhi)
    x = torch.where(fallback, near_x, x)
    y = torch.where(fallback, near_y, y)
    top, left = y - ch / 2, x - cw / 2
    if placement == "shift":
        top = torch.minimum(top.clamp_min(0), H - ch)
        left = torch.minimum(left.clamp_min(0), W - cw)
    crops = torch.stack([top, left, ch, cw], 1)
    return {"crops": crops, "flip": u[:, 23] < 0.5, "cell": cell, "fallback": fallback}


def sample_density_crop_cpu(P: np.ndarray, size: tuple[int, int], u: np.ndarray,
                            scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            placement: str = "restrict") -> tuple[list[float], bool, bool]:
    """:func:`sample_density_crops` for one sample in numpy/float64 (the ``__getitem__`` path of the cache design,
    ~10x less overhead than tiny torch ops): ((top, left, h, w) continuous, flip, fallback). Same formulas, same
    operation order."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; choose one of {PLACEMENTS}")
    P = np.asarray(P, np.float64)
    u = np.asarray(u, np.float64).reshape(-1)
    H, W = float(size[0]), float(size[1])
    gh, gw = P.shape
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    s = scale[0] + (scale[1] - scale[0]) * u[0:20:2]
    r = np.exp(lr0 + (lr1 - lr0) * u[1:20:2])
    area = s * H * W
    w, h = np.round(np.sqrt(area * r)), np.round(np.sqrt(area / r))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    if ok.any():
        k = int(np.argmax(ok))
        ch, cw = float(h[k]), float(w[k])
    else:
        in_ratio = W / H
        cw = W if in_ratio < ratio[0] else (float(np.round(H * ratio[1])) if in_ratio > ratio[1] else W)
        ch = float(np.round(W / ratio[0])) if in_ratio < ratio[0] else H
    Xlo, Xhi, Ylo, Yhi = cw / 2, W - cw / 2, ch / 2, H - ch / 2

    def overlap(n: int, length: float, lo: float, hi: float) -> np.ndarray:
        c = length / n
        j = np.arange(n, dtype=np.float64)
        if hi - lo <= 0:
            out = np.zeros(n)
            out[int(min(max(math.ceil(lo / c) - 1, 0), n - 1))] = 1.0
            return out
        return np.clip(np.minimum((j + 1) * c, hi) - np.maximum(j * c, lo), 0, None) / c

    if placement == "restrict":
        q = P * overlap(gh, H, Ylo, Yhi)[:, None] * overlap(gw, W, Xlo, Xhi)[None, :]
    else:
        q = P
    q = q.reshape(-1)
    total = q.sum()
    fallback = bool(total < 1e-30)
    if fallback:
        cell = int(np.argmax(P.reshape(-1)))
    else:
        cell = int(min(np.searchsorted(np.cumsum(q), u[20] * total, side="right"), gh * gw - 1))
    i, j = cell // gw, cell % gw
    cx0, cx1 = j * W / gw, (j + 1) * W / gw
    cy0, cy1 = i * H / gh, (i + 1) * H / gh
    if placement == "restrict":
        x0, x1 = max(cx0, Xlo), min(cx1, Xhi)
        y0, y1 = max(cy0, Ylo), min(cy1, Yhi)
        x1, y1 = max(x1, x0), max(y1, y0)
    else:
        x0, x1, y0, y1 = cx0, cx1, cy0, cy1
    x, y = x0 + (x1 - x0) * u[21], y0 + (y1 - y0) * u[22]
    if fallback:
        x = min(max((cx0 + cx1) / 2, Xlo), Xhi)
        y = min(max((cy0 + cy1) / 2, Ylo), Yhi)
    top, left = y - ch / 2, x - cw / 2
    if placement == "shift":
        top, left = min(max(top, 0.0), H - ch), min(max(left, 0.0), W - cw)
    return [top, left, ch, cw], bool(u[23] < 0.5), fallback


def round_crop(crop: Sequence[float], size: tuple[int, int]) -> list[int]:
    """:func:`round_crops` for one crop: floor(v + 1/2), clamped inside the (H, W) image."""
    H, W = size
    h = min(max(math.floor(crop[2] + 0.5), 1), H)
    w = min(max(math.floor(crop[3] + 0.5), 1), W)
    return [min(max(math.floor(crop[0] + 0.5), 0), H - h), min(max(math.floor(crop[1] + 0.5), 0), W - w), h, w]


def round_crops(crops: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Continuous (B, 4) crops -> integer (top, left, h, w): floor(v + 1/2), clamped inside the (B, 2) sizes."""
    c = crops.to(torch.float64)
    h = torch.clamp(torch.floor(c[:, 2] + 0.5), min=1)
    w = torch.clamp(torch.floor(c[:, 3] + 0.5), min=1)
    H, W = sizes[:, 0].to(c), sizes[:, 1].to(c)
    h, w = torch.minimum(h, H), torch.minimum(w, W)
    top = torch.minimum(torch.floor(c[:, 0] + 0.5).clamp_min(0), H - h)
    left = torch.minimum(torch.floor(c[:, 1] + 0.5).clamp_min(0), W - w)
    return torch.stack([top, left, h, w], 1).long()


@dataclass
class DensityConfig:
    """Options of §3 (defaults = the spec)."""

    block: int = -1
    k: int = 5
    minmax: bool = False
    temperature: float | None = None
    values: str = "logit"
    outlier: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    placement: str = "restrict"
    att_size: int = 224
    canvas: int = 512

    def __post_init__(self) -> None:
        if self.k < 1 or self.k % 2 == 0:
            raise ValueError(f"density filter k={self.k} must be odd and positive")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; choose one of {PLACEMENTS}")
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)


def canvas_image(image, canvas: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Design A's dataset output: (3, H, W) uint8 resized (aspect kept, antialiased, never upscaled) to a longer side
    <= ``canvas`` and zero-padded to canvas x canvas, plus the valid size (H_v, W_v)."""
    from torchvision.transforms.v2 import functional as TF

    x = as_uint8_chw(image)
    H, W = x.shape[-2:]
    f = min(1.0, canvas / max(H, W))
    Hv, Wv = max(1, round(H * f)), max(1, round(W * f))
    if (Hv, Wv) != (H, W):
        x = TF.resize(x, [Hv, Wv], antialias=True)
    out = torch.zeros(3, canvas, canvas, dtype=torch.uint8)
    out[:, :Hv, :Wv] = x
    return out, (Hv, Wv)


class OnlineDensityCrops(nn.Module):
    """Design A (``density_source="online"``): density crops of a whole batch on its device.

    ``forward(canvas (B, 3, C, C) uint8, valid (B, 2) (H_v, W_v), u (B, 24) | None)`` -> dict with ``images``
    (B, 3, S, S) normalised with ``mean``/``std``, ``crops`` (B, 4) continuous (top, left, h, w) in valid-image pixels,
    ``flip`` and ``fallback``. Steps: roi_align each valid region to att_size^2, one no-grad eval-mode backbone forward
    (bf16 autocast on CUDA), density, the vectorised sampler, roi_align the canvas to S^2 (aligned, adaptive
    sampling), flip, normalise. The backbone is not trained; its parameters are frozen.
    """

    def __init__(self, backbone: nn.Module, out_size: int = 224, cfg: DensityConfig | None = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: int = 0):
        super().__init__()
        self.cfg = cfg or DensityConfig()
        if self.cfg.att_size % backbone.patch_size:
            raise ValueError(f"att_size={self.cfg.att_size} must be a multiple of the backbone patch size "
                             f"{backbone.patch_size}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.out_size = out_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bb_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("bb_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self.generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True) -> OnlineDensityCrops:  # the backbone always stays in eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def density(self, canvas: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 3, C, C) uint8 canvases -> P (B, g, g) of the valid regions squashed to att_size^2."""
        from torchvision.ops import roi_align

        B = canvas.shape[0]
        x = canvas.float().div_(255.0)
        v = valid.to(x.device, torch.float32)
        rois = torch.stack([torch.arange(B, device=x.device, dtype=torch.float32),
                            torch.zeros(B, device=x.device), torch.zeros(B, device=x.device), v[:, 1], v[:, 0]], 1)
        a = self.cfg.att_size
        xa = (roi_align(x, rois, (a, a), 1.0, 0, True) - self.bb_mean) / self.bb_std
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            attn = self.backbone.attention(xa, block=self.cfg.block).cls
        c = self.cfg
        return density_map(attn.float(), c.k, c.minmax, c.temperature, c.values, c.outlier)

    @torch.no_grad()
    def forward(self, canvas: torch.Tensor, valid: torch.Tensor, u: torch.Tensor | None = None) -> dict:
        from torchvision.ops import roi_align

        B = canvas.shape[0]
        P = self.density(canvas, valid)
        u = density_uniforms(B, self.generator) if u is None else u
        c = self.cfg
        s = sample_density_crops(P, valid, u, c.scale, c.ratio, c.placement)
        cr = s["crops"].float()
        dev = canvas.device
        rois = torch.stack([torch.arange(B, device=dev, dtype=torch.float32), cr[:, 1], cr[:, 0],
                            cr[:, 1] + cr[:, 3], cr[:, 0] + cr[:, 2]], 1)
        out = roi_align(canvas.float().div_(255.0), rois, (self.out_size, self.out_size), 1.0, 0, True)
        out = torch.where(s["flip"].to(dev)[:, None, None, None], out.flip(-1), out)
        return {"images": (out - self.mean) / self.std, "crops": s["crops"], "flip": s["flip"],
                "fallback": s["fallback"], "density": P}


@dataclass
class DensityCacheMeta:
    """What a density cache was made with; a mismatch at training time raises."""

    backbone: str
    weights: str
    block: int
    size: str
    values: str
    outlier: bool
    autocontrast: bool = False
    dinokit_version: str = field(default_factory=lambda: dinokit_version())


def dinokit_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("dinokit")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


@torch.no_grad()
def build_density_cache(backbone, images: Sequence, ids: Sequence[str], path: str | Path, block: int = -1,
                        size: str = "native", values: str = "logit", outlier: bool = True, batch_size: int = 32,
                        device: str | torch.device | None = None) -> Path:
    """Design B: one bucketed, batched pass over unaugmented images storing §3.1 steps 1-3 (before the filter) at
    patch resolution in fp16, one safetensors file keyed by image id, with its metadata."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    cfg = BoxConfig(block=block, size=size, autocontrast=False, values=values, outlier=outlier, batch_size=batch_size)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    p = backbone.patch_size
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    prepared = [prepare_input(im, p, cfg) for im in images]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(prepared):
        buckets.setdefault(tuple(x.shape[-2:]), []).append(i)
    maps: dict[str, torch.Tensor] = {}
    for idx in buckets.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = (torch.stack([prepared[i] for i in chunk]).to(device) - mean) / std
            sc = score_map(backbone.attention(x, block=block).cls.float(), values, outlier).cpu()
            for i, m in zip(chunk, sc):
                maps[str(ids[i])] = m.half().contiguous()
    w = backbone.weights_info.get("tag") or backbone.weights_info.get("source") or str(backbone.weights_info)
    meta = DensityCacheMeta(backbone.name, str(w), block, size, values, outlier)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(maps, str(tmp), metadata={k: json.dumps(v) for k, v in asdict(meta).items()})
    return path


class DensityCache:
    """Design B at training time: patch-resolution score maps by image id; ``crop(image, image_id, generator)`` runs
    filter, softmax, the sampler (one 24-uniform row) and ``resized_crop`` on the CPU, with no model."""

    def __init__(self, path: str | Path, expected: dict | None = None, ids: Sequence[str] | None = None,
                 cfg: DensityConfig | None = None, out_size: int = 224):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"density cache {self.path} does not exist; build it with "
                                    "`dinokit crops density-cache`")
        with safe_open(str(self.path), "pt") as f:
            raw = f.metadata() or {}
        self.meta = {k: json.loads(v) for k, v in raw.items()}
        for k, v in (expected or {}).items():
            if k in self.meta and self.meta[k] != v:
                raise ValueError(f"density cache {self.path} is stale: {k}={self.meta[k]!r} but the run uses {v!r}; "
                                 "rebuild it with `dinokit crops density-cache`")
        self.maps = load_file(str(self.path))
        if ids is not None:
            missing = [str(i) for i in ids if str(i) not in self.maps]
            if missing:
                raise ValueError(f"density cache {self.path} lacks {len(missing)} image(s) (first: {missing[:5]}); "
                                 "rebuild it on this dataset")
        self.cfg = cfg or DensityConfig()
        self.out_size = out_size
        self._P: dict[str, torch.Tensor] = {}

    def density(self, image_id: str) -> torch.Tensor:
        """(h, w) density P of one image (computed once per id and process: it depends on the map and cfg only)."""
        key = str(image_id)
        if key not in self._P:
            c = self.cfg
            self._P[key] = density_from_score(self.maps[key].float()[None], c.k, c.minmax, c.temperature)[0]
        return self._P[key]

    def crop(self, image, image_id: str, generator: torch.Generator | None = None,
             u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(3, H, W) uint8 tensor or PIL image -> (crop (3, S, S) uint8, integer (top, left, h, w), flipped)."""
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, np.ndarray):
            image = as_uint8_chw(image)
        H, W = image_hw(image)
        u = density_uniforms(1, generator) if u is None else u.reshape(1, -1)
        crop, flip, _ = sample_density_crop_cpu(self.density(image_id).numpy(), (H, W), u.numpy()[0], self.cfg.scale,
                                                self.cfg.ratio, self.cfg.placement)
        t, lf, h, w = round_crop(crop, (H, W))
        out = TF.resized_crop(image, t, lf, h, w, [self.out_size, self.out_size], antialias=True)
        if flip:
            out = TF.horizontal_flip(out)
        if not isinstance(out, torch.Tensor):
            out = TF.pil_to_tensor(out)
        return out, torch.tensor([t, lf, h, w]), flip
