"""Input sizes and position handling (docs/backbones.md)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from dinokit.backbones import load_backbone

SIZES = [(7, 7), (16, 24), (32, 32), (74, 37)]


def _random_table(bb) -> None:
    with torch.no_grad():
        bb.model.pos_embed.copy_(torch.randn_like(bb.model.pos_embed))


def offset_reference(bb, h, w) -> torch.Tensor:
    """Independent official-hub interpolation of the patch table: scale factor (h + 0.1)/M."""
    pe = bb.model.pos_embed[:, 0 if bb.num_registers else 1:]
    M = int(pe.shape[1] ** 0.5)
    grid = pe.reshape(1, M, M, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(h * w, -1)


@pytest.mark.parametrize("name,pos_interp", [("tiny_dino", "official"), ("tiny_dinov2", "official"),
                                             ("tiny_dinov2_reg", "offset")])
def test_offset_policy_equals_independent_interpolation(name, pos_interp):
    bb = load_backbone(name, weights="random", pos_interp=pos_interp)
    _random_table(bb)
    for h, w in SIZES:
        torch.testing.assert_close(bb.position_embedding(h, w), offset_reference(bb, h, w), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,pos_interp", [("tiny_dinov2_reg", "official"), ("tiny_dino", "antialias")])
def test_antialias_policy_equals_timm_dynamic(name, pos_interp):
    bb = load_backbone(name, weights="random", pos_interp=pos_interp)
    _random_table(bb)
    npt = 0 if bb.num_registers else 1
    for h, w in SIZES:
        ref = resample_abs_pos_embed(bb.model.pos_embed, new_size=(h, w), old_size=bb.model.patch_embed.grid_size,
                                     num_prefix_tokens=npt)[0, npt:]
        assert torch.equal(bb.position_embedding(h, w), ref)
    assert "_pos_embed" not in bb.model.__dict__  # timm's own dynamic path is used unchanged


def _manual_forward(bb, x, pos) -> torch.Tensor:
    """ViT forward with an explicitly given (h*w, D) patch table (non-register model)."""
    m = bb.model
    t = m.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
    t = t.flatten(1, 2)
    t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], 1)
    t = t + torch.cat([m.pos_embed[:, :1], pos[None]], 1)
    t = m.norm(m.blocks(m.norm_pre(m.patch_drop(t))))
    return t[:, 1:]


@pytest.mark.parametrize("name", ["tiny_dino", "tiny_dinov2"])
def test_forward_uses_offset_policy(name):
    bb = load_backbone(name, weights="random").eval()
    _random_table(bb)
    p = bb.patch_size
    x = torch.randn(1, 3, 5 * p, 7 * p)
    ref = _manual_forward(bb, x, offset_reference(bb, 5, 7))
    torch.testing.assert_close(bb.forward_features(x).flat(), ref, atol=1e-5, rtol=0)
    inter = bb.intermediate_layers(x, [-1])[0]
    torch.testing.assert_close(inter.flat(), ref, atol=1e-5, rtol=0)
    timm_default = bb.model.__class__._pos_embed  # timm's antialiased resampling differs at non-native sizes
    with torch.no_grad():
        t = bb.model.norm(bb.model.blocks(timm_default(bb.model, bb.model.patch_embed(x))))[:, 1:]
    assert (t - ref).abs().max() > 1e-4


def test_table_cache_and_gradients():
    bb = load_backbone("tiny_dino", weights="random")
    with torch.no_grad():
        a, b = bb.position_embedding(6, 9), bb.position_embedding(6, 9)
        assert a is b  # cached when no gradient is needed
        bb.model.pos_embed.mul_(2)  # in-place update bumps the version counter: cache invalidated
        c = bb.position_embedding(6, 9)
    torch.testing.assert_close(c, 2 * a)
    with torch.inference_mode():
        d = bb.position_embedding(6, 9)
    assert d.is_inference() and not bb.position_embedding(6, 9).is_inference()
    p = bb.patch_size
    bb.forward_features(torch.randn(1, 3, 6 * p, 9 * p)).patch.sum().backward()
    assert bb.model.pos_embed.grad is not None and bb.model.pos_embed.grad.abs().sum() > 0


def test_deepcopy_rebinds_position_step():
    bb = load_backbone("tiny_dino", weights="random").eval()
    twin = copy.deepcopy(bb)
    with torch.no_grad():
        twin.model.pos_embed.add_(1.0)
    assert twin.model._pos_embed.model is twin.model
    x = torch.randn(1, 3, 80, 48)
    assert not torch.equal(twin.forward_features(x).patch, bb.forward_features(x).patch)


def test_rope_refuses_pos_interp():
    with pytest.raises(ValueError, match="pos_interp must be 'official'"):
        load_backbone("tiny_dinov3", weights="random", pos_interp="offset")
    assert load_backbone("tiny_dinov3", weights="random").position_embedding(3, 4) is None


def test_grid_examples_and_rope_any_size():
    assert load_backbone("tiny_dino", "random").grid_size(224, 336) == (14, 21)
    assert load_backbone("tiny_dinov2", "random").grid_size(224, 336) == (16, 24)
    bb = load_backbone("tiny_dinov3", "random").eval()
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    f = bb.forward_features(torch.randn(1, 3, 96, 160))
    assert f.grid == (6, 10) and f.patch.shape == (1, 6, 10, 64)
    after = bb.model.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["tiny_dino", "tiny_dinov2", "tiny_dinov2_reg", "tiny_dinov3"])
def test_native_size_equals_timm_forward(name):
    bb = load_backbone(name, weights="random").eval()
    M = bb.model.patch_embed.grid_size
    x = torch.randn(2, 3, M[0] * bb.patch_size, M[1] * bb.patch_size)
    f = bb.forward_features(x)
    ref = type(bb.model).forward_features(bb.model, x)  # the class method: no dinokit replacement involved
    P = bb.num_prefix_tokens
    assert torch.equal(f.flat(), ref[:, P:]) and torch.equal(f.cls, ref[:, 0])
    assert torch.equal(f.registers, ref[:, 1:P])


def test_size_policies():
    x = torch.randn(1, 3, 230, 340)
    err = load_backbone("tiny_dino", "random")
    with pytest.raises(ValueError, match=r"230x340.*16.*tiny_dino.*224 or 240 by 336 or 352.*crop"):
        err.forward_features(x)
    crop = load_backbone("tiny_dino", "random", size_policy="crop").eval()
    fc = crop.forward_features(x)
    assert torch.equal(fc.patch, crop.forward_features(x[..., :224, :336]).patch) and fc.image_size == (224, 336)
    pad = load_backbone("tiny_dino", "random", size_policy="pad").eval()
    fp = pad.forward_features(x)
    assert fp.grid == (15, 22) and fp.valid.shape == (15, 22) and bool(fp.valid.all())
    assert torch.equal(fp.patch, pad.forward_features(F.pad(x, (0, 12, 0, 10))).patch)
    assert pad.forward_features(torch.randn(1, 3, 32, 48)).valid.all()
    rs = load_backbone("tiny_dino", "random", size_policy="resize").eval()
    assert rs.forward_features(x).grid == (14, 21)
    assert rs.forward_features(torch.randn(1, 3, 5, 40)).grid == (1, 2)
    for bb in (err, crop, pad):
        with pytest.raises(ValueError, match="smaller than one 16-px patch"):
            bb.forward_features(torch.randn(1, 3, 8, 64))
