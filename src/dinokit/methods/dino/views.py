"""Batched multi-crop views for DINO-style self-distillation, and an unbounded seeded stream of synthetic scenes.

Every augmentation runs on a whole batch of images at once (one ``grid_sample`` for the crops, tensor arithmetic for
the photometric changes), so a training step costs a few tensor ops rather than a Python loop over images. All random
choices come from one ``torch.Generator``: the same generator state gives the same views. See docs/methods/dino.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R 601 luma weights (grayscale and contrast)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop settings (sizes in pixels, scales as fractions of the image area).

    ``n_global`` crops of ``global_size`` with area in ``global_scale`` and ``n_local`` crops of ``local_size`` with
    area in ``local_scale``; aspect ratio log-uniform in ``ratio``; horizontal flip p 0.5; colour jitter
    (brightness, contrast, saturation, hue) with probability ``p_jitter``; grayscale ``p_gray``; Gaussian blur
    (sigma in ``blur_sigma`` pixels of the output) with p 1.0 / 0.1 on the two global views and 0.5 on locals;
    solarisation with p ``p_solarize`` on the second global view.
    """

    global_size: int = 64
    local_size: int = 32
    n_global: int = 2
    n_local: int = 6
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_scale: tuple[float, float] = (0.08, 0.35)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p_jitter: float = 0.8
    p_gray: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    p_solarize: float = 0.2

    def __post_init__(self) -> None:
        if self.n_global < 1:
            raise ValueError(f"n_global={self.n_global}: DINO needs at least one global view (2 is standard)")
        if self.n_local < 0:
            raise ValueError(f"n_local={self.n_local} must be >= 0")
        for name in ("global_scale", "local_scale", "ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}={(lo, hi)}: need 0 < low <= high")


def random_resized_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float],
                         generator: torch.Generator) -> torch.Tensor:
    """(n, 4) crop boxes ``[cx, cy, w, h]`` in fractions of the image side: area fraction ~ U(scale), aspect ratio
    log-uniform in ``ratio`` (w / h), both sides clipped to 1, the centre uniform where the box fits."""
    area = torch.empty(n).uniform_(*scale, generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = logr.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=generator) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=generator) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear crop-and-resize of (B, C, H, W) float images to (B, C, size, size).

    ``boxes``: (B, 4) ``[cx, cy, w, h]`` in fractions of the side; ``flip``: (B,) bool horizontal flips.
    """
    B = images.shape[0]
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)
    sx = boxes[:, 2].to(images)
    if flip is not None:
        sx = torch.where(flip.to(images.device), -sx, sx)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = boxes[:, 3].to(images)
    theta[:, 0, 2] = boxes[:, 0].to(images) * 2 - 1
    theta[:, 1, 2] = boxes[:, 1].to(images) * 2 - 1
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)  # exact inverse, so a zero hue turn is an identity up to float rounding


def _rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", _YIQ.to(x), x)


def _yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", _YIQ_INV.to(x), x)


def colour_jitter(x: torch.Tensor, cfg: MultiCropConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter (applied with p ``cfg.p_jitter``), then grayscale
    with p ``cfg.p_gray``. (B, 3, H, W) in [0, 1] -> same shape in [0, 1]. Hue turns the chroma plane of YIQ by
    an angle in +-``2 pi cfg.hue``."""
    B = x.shape[0]

    def u(a: float) -> torch.Tensor:
        return (1 + torch.empty(B).uniform_(-a, a, generator=generator)).view(B, 1, 1, 1).to(x)

    apply = (torch.rand(B, generator=generator) < cfg.p_jitter).view(B, 1, 1, 1).to(x.device)
    b, c, s = u(cfg.brightness), u(cfg.contrast), u(cfg.saturation)
    ang = (torch.empty(B).uniform_(-cfg.hue, cfg.hue, generator=generator) * 2 * math.pi).to(x)
    y = (x * b).clamp(0, 1)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * s + g).clamp(0, 1)
    yiq = _rgb_to_yiq(y)
    cos, sin = ang.cos().view(B, 1, 1), ang.sin().view(B, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    y = _yiq_to_rgb(yiq).clamp(0, 1)
    x = torch.where(apply, y, x)
    gray = (torch.rand(B, generator=generator) < cfg.p_gray).view(B, 1, 1, 1).to(x.device)
    return torch.where(gray, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per-image separable Gaussian blur with probability ``p``, sigma ~ U(sigma) pixels (kernel 2 ceil(3 s_max) + 1,
    reflect padding). (B, C, H, W) -> same shape."""
    B, C, H, W = x.shape
    s = torch.empty(B).uniform_(*sigma, generator=generator)
    on = torch.rand(B, generator=generator) < p
    if not bool(on.any()):
        return x
    r = max(1, math.ceil(3 * sigma[1]))
    r = min(r, (min(H, W) - 1) // 2)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / s[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).to(x.device)  # (B, 2r + 1)
    kc = k.repeat_interleave(C, 0)  # (B*C, 2r + 1)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), kc.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), kc.view(B * C, 1, -1, 1), groups=B * C)
    return torch.where(on.view(B, 1, 1, 1).to(x.device), y.view(B, C, H, W), x)


def solarize(x: torch.Tensor, p: float, generator: torch.Generator, threshold: float = 0.5) -> torch.Tensor:
    """Per-image solarisation with probability ``p``: values >= threshold become 1 - value. (B, C, H, W) in [0, 1]."""
    on = (torch.rand(x.shape[0], generator=generator) < p).view(-1, 1, 1, 1).to(x.device)
    return torch.where(on & (x >= threshold), 1 - x, x)


class MultiCropViews:
    """Batched DINO multi-crop: ``views(images_uint8)`` -> (list of global views, list of local views), each a
    normalised float (B, 3, S, S) tensor; view 1 is always blurred, view 2 rarely blurred and sometimes solarised
    (the asymmetric BYOL/DINO recipe). ``images``: (B, 3, H, W) uint8 or float in [0, 1]."""

    def __init__(self, cfg: MultiCropConfig | None = None, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        self.cfg = cfg or MultiCropConfig()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def _one(self, x: torch.Tensor, size: int, scale: tuple[float, float], p_blur: float, p_sol: float,
             g: torch.Generator) -> torch.Tensor:
        B = x.shape[0]
        boxes = random_resized_boxes(B, scale, self.cfg.ratio, g)
        flip = torch.rand(B, generator=g) < 0.5
        v = crop_resize(x, boxes, size, flip)
        v = colour_jitter(v, self.cfg, g)
        v = gaussian_blur(v, p_blur, self.cfg.blur_sigma, g)
        if p_sol > 0:
            v = solarize(v, p_sol, g)
        return (v - self.mean.to(v)) / self.std.to(v)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor],
                                                                                  list[torch.Tensor]]:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        c = self.cfg
        glob = []
        for i in range(c.n_global):
            p_blur = 1.0 if i == 0 else 0.1
            p_sol = c.p_solarize if i == 1 else 0.0
            glob.append(self._one(x, c.global_size, c.global_scale, p_blur, p_sol, generator))
        loc = [self._one(x, c.local_size, c.local_scale, 0.5, 0.0, generator) for _ in range(c.n_local)]
        return glob, loc


def random_patch_masks(n: int, grid: tuple[int, int], ratio: tuple[float, float], p_masked: float,
                       generator: torch.Generator) -> torch.Tensor:
    """(n, h, w) boolean masks for masked-patch distillation: with probability ``p_masked`` an image gets
    round(U(ratio) h w) masked cells chosen uniformly without replacement, otherwise none."""
    h, w = grid
    N = h * w
    frac = torch.empty(n).uniform_(*ratio, generator=generator)
    k = torch.where(torch.rand(n, generator=generator) < p_masked, (frac * N).round(), torch.zeros(n)).long()
    order = torch.rand(n, N, generator=generator).argsort(dim=1)
    rank = order.argsort(dim=1)
    return (rank < k[:, None]).view(n, h, w)


class SceneStream(torch.utils.data.Dataset):
    """``n`` synthetic scenes (uint8 (3, H, W) tensors) of benchmark ``seed``; every ``fine_every``-th index is a
    fine-grained scene (0: none). Scene ``i`` depends only on (seed, i), so a long stream is reproducible and
    never repeats; pick a ``seed`` that no evaluation split uses."""

    def __init__(self, n: int, size: int = 64, seed: int = 1000, fine_every: int = 0):
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if fine_every < 0:
            raise ValueError(f"fine_every={fine_every} must be >= 0 (0: no fine-grained scenes)")
        self.n, self.size, self.seed, self.fine_every = n, size, seed, fine_every

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        from ...data.synthetic import render_scene

        if not 0 <= i < self.n:
            raise IndexError(i)
        fine = self.fine_every > 0 and i % self.fine_every == self.fine_every - 1
        img = render_scene(self.seed, i, (self.size, self.size), fine_grained=fine).image
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
