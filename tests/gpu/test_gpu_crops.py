"""Attention-density crops on the device against the CPU (see docs/methods/localisation.md).

- The vectorised sampler given the same density P, image sizes and random rows: on the device it draws the same
  cells and flips, continuous crops within 1e-9 px and identical integer boxes; the per-sample numpy sampler of the
  cache design gives the same box within +-1 px (the rule that joins the two designs).
- Design A (``OnlineDensityCrops``, a bf16-autocast backbone forward on CUDA) vs the same module on the CPU (fp32):
  densities within a total variation of 0.02 per image; the device's own boxes equal the numpy sampler's boxes on the
  device's P within +-1 px; where both devices draw the same cell, the crops agree within 1e-6 px and the cropped
  images within 1e-4.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from dinokit.backbones import load_backbone
from dinokit.data import crops as C

from ._parity import generator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _numpy_boxes(P: torch.Tensor, sizes: torch.Tensor, u: torch.Tensor, **kw) -> torch.Tensor:
    """The cache design's per-sample numpy sampler + rounding, one row per sample: (B, 4) int64."""
    out = []
    for b in range(P.shape[0]):
        H, W = (int(v) for v in sizes[b].tolist())
        crop, _, _ = C.sample_density_crop_cpu(P[b].double().cpu().numpy(), (H, W), u[b].numpy(), **kw)
        out.append(C.round_crop(crop, (H, W)))
    return torch.tensor(out)


def check_density_sampler(device: str) -> None:
    g = generator(0)
    B = 256
    P = C.density_map(torch.rand(B, 2, 6, 8, generator=g))
    P[:8] = torch.where(P[:8] > P[:8].flatten(1).amax(1)[:, None, None] * 0.9, P[:8], torch.zeros_like(P[:8]))
    sizes = torch.randint(1, 300, (B, 2), generator=g).double()
    sizes[8:16] = torch.tensor([[375.0, 500.0]])
    u = C.density_uniforms(B, g)
    for placement, scale in (("restrict", (0.08, 1.0)), ("shift", (0.08, 1.0)), ("restrict", (1.0, 1.0))):
        kw = dict(scale=scale, placement=placement)
        cpu = C.sample_density_crops(P, sizes, u, **kw)
        dev = C.sample_density_crops(P.to(device), sizes.to(device), u, **kw)
        assert dev["crops"].device.type == torch.device(device).type
        for k in ("cell", "flip", "fallback"):
            assert torch.equal(dev[k].cpu(), cpu[k]), (placement, scale, k)
        assert (dev["crops"].cpu() - cpu["crops"]).abs().max() <= 1e-9
        boxes = C.round_crops(dev["crops"], sizes.to(device)).cpu()
        assert torch.equal(boxes, C.round_crops(cpu["crops"], sizes)), (placement, scale)
        assert (boxes - _numpy_boxes(P, sizes, u, **kw)).abs().max() <= 1
        assert (boxes[:, 2:] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]).all()
        assert (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1]).all()


@functools.cache
def _online_inputs() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    bb = load_backbone("tiny_dino", weights="random").eval()
    rng = np.random.default_rng(0)
    shapes = [(128, 128), (96, 128), (128, 80), (64, 64), (128, 128), (100, 120), (128, 50), (77, 128)]
    canv, valid = zip(*(C.canvas_image(rng.integers(0, 255, (h, w, 3), np.uint8), 128) for h, w in shapes))
    return bb, torch.stack(canv), torch.tensor(valid), C.density_uniforms(len(shapes), generator(1))


def check_online_density_crops(device: str) -> None:
    bb, canv, valid, u = _online_inputs()
    cfg = C.DensityConfig(att_size=128, canvas=128)  # an 8 x 8 attention grid
    cpu = C.OnlineDensityCrops(bb, out_size=32, cfg=cfg)(canv, valid, u)
    mod = C.OnlineDensityCrops(load_backbone("tiny_dino", weights="random"), out_size=32, cfg=cfg)
    mod.backbone.load_state_dict(bb.state_dict())
    dev = mod.to(device)(canv.to(device), valid.to(device), u)
    Pc, Pd = cpu["density"], dev["density"].float().cpu()
    assert torch.allclose(Pd.sum((1, 2)), torch.ones(len(u)), atol=1e-5) and (Pd >= 0).all()
    tv = 0.5 * (Pd - Pc).abs().sum((1, 2))
    assert tv.max() <= 0.02, f"density total variation CPU vs {device}: {tv.tolist()}"
    boxes = C.round_crops(dev["crops"], valid.to(device)).cpu()
    assert (boxes - _numpy_boxes(Pd, valid, u, scale=cfg.scale, ratio=cfg.ratio)).abs().max() <= 1
    assert torch.equal(dev["flip"].cpu(), cpu["flip"])
    assert dev["images"].shape == (len(u), 3, 32, 32) and torch.isfinite(dev["images"]).all()
    same = (C.sample_density_crops(Pd, valid, u)["cell"] == C.sample_density_crops(Pc, valid, u)["cell"])
    assert bool(same.any()), "no sample drew the same cell on both devices"
    assert (dev["crops"].cpu()[same] - cpu["crops"][same]).abs().max() <= 1e-6
    assert (dev["images"].cpu()[same] - cpu["images"][same]).abs().max() <= 1e-4


CHECKS = [check_density_sampler, check_online_density_crops]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_gpu_density_crops(check) -> None:
    check("cuda")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_self_check_on_cpu(check) -> None:
    check("cpu")
