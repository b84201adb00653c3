"""Attention-density crops (§3 of crops.md): density map, vectorised sampler, designs A (online) and B (cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dinokit.data import crops as C


@pytest.fixture(scope="module")
def tiny_backbone():
    from dinokit.backbones import load_backbone

    return load_backbone("tiny_dino", weights="random").eval()


def test_density_is_a_distribution_and_reduces_to_a_softmax():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 6, 8, generator=g)
    for minmax in (False, True):
        P = C.density_map(a, minmax=minmax)
        assert (P >= 0).all() and torch.allclose(P.sum((-2, -1)), torch.ones(3, dtype=P.dtype), atol=1e-6)
    x = C.score_map(a, "logit", outlier=False)
    P1 = C.density_map(a, k=1, outlier=False, temperature=0.4)
    assert torch.allclose(P1.flatten(1), (x.flatten(1) / 0.4).softmax(-1), atol=1e-10)
    v = C.attention_values(a, "logit")
    c = torch.randn(3, 2, 1, 1, generator=g)
    assert torch.allclose(C.density_from_score(C.score_from_values(v + c)),
                          C.density_from_score(C.score_from_values(v)), atol=1e-8)


def _cells(out: dict, sizes: torch.Tensor, gh: int, gw: int) -> np.ndarray:
    cr = out["crops"]
    cy, cx = cr[:, 0] + cr[:, 2] / 2, cr[:, 1] + cr[:, 3] / 2
    i = torch.clamp((cy / (sizes[:, 0] / gh)).floor().long(), 0, gh - 1)
    j = torch.clamp((cx / (sizes[:, 1] / gw)).floor().long(), 0, gw - 1)
    return (i * gw + j).numpy()


def test_centre_histogram_follows_the_density_chi_square():
    g = torch.Generator().manual_seed(1)
    gh, gw, n = 4, 5, 20_000
    P = C.density_map(torch.rand(1, 2, gh, gw, generator=g) ** 2, k=1, temperature=0.05)
    sizes = torch.tensor([[4000.0, 5000.0]]).repeat(n, 1)
    u = C.density_uniforms(n, torch.Generator().manual_seed(2))
    out = C.sample_density_crops(P.expand(n, gh, gw), sizes, u, scale=(1e-6, 1e-6))  # tiny crops
    assert (out["cell"].numpy() == _cells(out, sizes, gh, gw)).all()
    hist = np.bincount(out["cell"].numpy(), minlength=gh * gw)
    assert chisquare(hist, P.flatten().numpy() * n).pvalue > 0.001
    # large crops: the histogram follows q / sum(q) (P times the feasible fraction of each cell)
    sizes = torch.tensor([[40.0, 50.0]]).repeat(n, 1)
    big = C.sample_density_crops(P.expand(n, gh, gw), sizes, u, scale=(0.3, 0.3), ratio=(1.0, 1.0))
    ch, cw = big["crops"][0, 2].item(), big["crops"][0, 3].item()
    def ov(L, cells, s):
        lo, hi = s / 2, L - s / 2
        edges = np.arange(cells + 1) * L / cells
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) / (L / cells)
    q = P[0].double().numpy() * ov(40, gh, ch)[:, None] * ov(50, gw, cw)[None]
    q = (q / q.sum()).ravel()
    hist = np.bincount(_cells(big, sizes, gh, gw), minlength=gh * gw)
    keep = q > 0
    assert hist[~keep].sum() == 0
    assert chisquare(hist[keep], q[keep] * n).pvalue > 0.001


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), H=st.integers(1, 200), W=st.integers(1, 200),
       placement=st.sampled_from(["restrict", "shift"]), full=st.booleans())
def test_density_crops_inside_and_non_empty_for_every_placement(seed, H, W, placement, full):
    g = torch.Generator().manual_seed(seed)
    B = 16
    P = C.density_map(torch.rand(B, 2, 4, 6, generator=g))
    sizes = torch.tensor([[H, W]], dtype=torch.float64).repeat(B, 1)
    u = C.density_uniforms(B, g)
    scale = (1.0, 1.0) if full else (0.08, 1.0)  # full: w = W or h = H
    out = C.sample_density_crops(P, sizes, u, scale=scale, placement=placement)
    t, lf, h, w = out["crops"].T
    eps = 1e-9
    assert (h > 0).all() and (w > 0).all()
    assert (t >= -eps).all() and (lf >= -eps).all() and (t + h <= H + eps).all() and (lf + w <= W + eps).all()
    if placement == "restrict":
        assert not out["fallback"].any()  # P > 0 everywhere
    r = C.round_crops(out["crops"], sizes)
    assert (r[:, 2] >= 1).all() and (r[:, 3] >= 1).all() and (r[:, 0] >= 0).all() and (r[:, 1] >= 0).all()
    assert (r[:, 0] + r[:, 2] <= H).all() and (r[:, 1] + r[:, 3] <= W).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), H=st.integers(1, 300), W=st.integers(1, 300),
       placement=st.sampled_from(["restrict", "shift"]), tiny=st.booleans())
def test_cpu_single_sample_sampler_equals_the_vectorised_one(seed, H, W, placement, tiny):
    g = torch.Generator().manual_seed(seed)
    B = 8
    P = C.density_map(torch.rand(B, 2, 3, 5, generator=g))
    if tiny:
        P = torch.where(P > P.flatten(1).max(1).values[:, None, None] * 0.9, P, torch.zeros_like(P))
    sizes = torch.tensor([[H, W]], dtype=torch.float64).repeat(B, 1)
    u = C.density_uniforms(B, g)
    out = C.sample_density_crops(P, sizes, u, placement=placement)
    rounded = C.round_crops(out["crops"], sizes)
    for b in range(B):
        crop, flip, fb = C.sample_density_crop_cpu(P[b].numpy(), (H, W), u[b].numpy(), placement=placement)
        np.testing.assert_allclose(crop, out["crops"][b].numpy(), rtol=0, atol=1e-9)
        assert flip == bool(out["flip"][b]) and fb == bool(out["fallback"][b])
        assert C.round_crop(crop, (H, W)) == rounded[b].tolist()


def test_crop_shapes_follow_torchvision_rule_and_fallback():
    u = torch.full((1, 24), 0.5, dtype=torch.float64)
    h, w = C.crop_shapes(u, torch.tensor([[100.0, 100.0]]), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert (h.item(), w.item()) == (50.0, 50.0)
    # no candidate fits a 1 x 100 image at ratio ~1: torchvision's centre-crop size with the ratio clamped
    h, w = C.crop_shapes(u, torch.tensor([[1.0, 100.0]]), scale=(0.5, 1.0))
    assert (h.item(), w.item()) == (1.0, 1.0)


def test_zero_density_falls_back_to_the_argmax_cell():
    P = torch.zeros(1, 3, 3, dtype=torch.float64)
    P[0, 2, 2] = 1.0
    sizes = torch.tensor([[90.0, 90.0]])
    u = torch.full((1, 24), 0.5, dtype=torch.float64)
    out = C.sample_density_crops(P, sizes, u, scale=(0.9, 0.9), ratio=(1.0, 1.0))  # 85 px crops: cell 8 infeasible
    assert out["fallback"].item()
    t, lf, h, w = out["crops"][0].tolist()
    assert t + h == pytest.approx(90) and lf + w == pytest.approx(90)  # nearest feasible centre to (75, 75)


def test_online_and_cache_designs_give_the_same_box(tiny_backbone, tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64, 3), np.uint8) for _ in range(4)]
    cfg = C.DensityConfig(att_size=64, canvas=64)
    online = C.OnlineDensityCrops(tiny_backbone, out_size=32, cfg=cfg)
    canv = torch.stack([C.canvas_image(im, 64)[0] for im in imgs])
    valid = torch.tensor([[64, 64]] * 4)
    u = C.density_uniforms(4, torch.Generator().manual_seed(3))
    out = online(canv, valid, u)
    assert out["images"].shape == (4, 3, 32, 32) and torch.isfinite(out["images"]).all()
    # the cache holds steps 1-3 of the same maps; B then filters, softmaxes, samples and rounds
    xa = (canv.float() / 255 - online.bb_mean) / online.bb_std
    sc = C.score_map(tiny_backbone.attention(xa).cls)
    save_file({str(i): sc[i].contiguous() for i in range(4)}, str(tmp_path / "maps.safetensors"))
    cache = C.DensityCache(tmp_path / "maps.safetensors", cfg=cfg, out_size=32)
    for i in range(4):
        crop, box, flip = cache.crop(imgs[i], str(i), u=u[i])
        a = C.round_crops(out["crops"][i:i + 1], valid[i:i + 1].double())[0]
        assert (box - a).abs().max() <= 1
        assert flip == bool(out["flip"][i]) and crop.shape == (3, 32, 32)


def test_density_cache_build_metadata_and_errors(tiny_backbone, tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, s, np.uint8) for s in [(64, 80, 3), (48, 64, 3), (64, 80, 3)]]
    ids = ["1", "2", "3"]
    path = C.build_density_cache(tiny_backbone, imgs, ids, tmp_path / "d.safetensors", batch_size=2)
    cache = C.DensityCache(path, expected={"backbone": "tiny_dino", "block": -1}, ids=ids)
    assert cache.maps["1"].shape == (4, 5) and cache.maps["1"].dtype == torch.float16
    assert path.stat().st_size < 4096 * len(ids)
    crop, box, _ = cache.crop(imgs[0], "1", torch.Generator().manual_seed(0))
    assert crop.dtype == torch.uint8 and box[2] >= 1 and box[3] >= 1
    with pytest.raises(ValueError, match="stale"):
        C.DensityCache(path, expected={"backbone": "tiny_dinov2"})
    with pytest.raises(ValueError, match="lacks 1 image"):
        C.DensityCache(path, ids=["1", "4"])
    with pytest.raises(FileNotFoundError, match="density-cache"):
        C.DensityCache(tmp_path / "nope.safetensors")


def test_canvas_keeps_aspect_and_never_upscales():
    x, (hv, wv) = C.canvas_image(np.full((30, 60, 3), 7, np.uint8), 40)
    assert x.shape == (3, 40, 40) and (hv, wv) == (20, 40) and x[:, 20:].sum() == 0
    _, (hv, wv) = C.canvas_image(np.zeros((10, 20, 3), np.uint8), 40)
    assert (hv, wv) == (10, 20)
