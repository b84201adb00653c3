"""Attention-density crops: the density map, a vectorised sampler, the batched on-device pipeline
(``OnlineDensityCrops``) and the precomputed patch-resolution cache (``DensityCache``). A crop is
``(top, left, height, width)``; map arithmetic is fp32 (fp64 for the sampler's cumulative sums).
See docs/methods/localisation.md."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...io import atomic_path, dinokit_version
from .boxes import BoxConfig, as_uint8_chw, box_filter, image_hw, prepare_input, score_map, to_float

PLACEMENTS = ("restrict", "shift")
N_UNIFORMS = 24  # 10 x (scale, log-ratio), cell, x, y, flip


def density_from_score(x: torch.Tensor, k: int = 5, minmax: bool = False,
                       temperature: float | None = None) -> torch.Tensor:
    """§3.1 steps 2-4 on a (B, h, w) score map: k x k mean (symmetric padding), optional min-max, softmax(x / T) over
    the cells (T = 0.4, or 0.1 with min-max). Returns P (B, h, w), P >= 0, sum 1."""
    T = temperature if temperature is not None else (0.1 if minmax else 0.4)
    if T <= 0:
        raise ValueError(f"temperature={T} must be positive")
    x = box_filter(x, (k, k)) if k > 1 else to_float(x)
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


@torch.no_grad()
def build_density_cache(backbone, images: Sequence, ids: Sequence[str], path: str | Path, block: int = -1,
                        size: str = "native", values: str = "logit", outlier: bool = True, batch_size: int = 32,
                        device: str | torch.device | None = None) -> Path:
    """Design B: one bucketed, batched pass over unaugmented images storing §3.1 steps 1-3 (before the filter) at
    patch resolution in fp16, one safetensors file keyed by image id, with its metadata."""
    from safetensors.torch import save_file
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
