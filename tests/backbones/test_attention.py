"""Attention maps and facets (docs/backbones.md) on DINO-v1-like, DINOv2-reg-like and DINOv3-like (RoPE) tiny models."""

import math

import pytest
import torch

from dinokit.backbones import load_backbone

NAMES = ["tiny_dino", "tiny_dinov2_reg", "tiny_dinov3"]
SHAPES = [(4, 4), (4, 6)]  # square and 224x336-like (2:3)


@pytest.fixture(scope="module", params=NAMES)
def bb(request):
    bb = load_backbone(request.param, weights="random").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial biases, layer scales and positions
        for p in bb.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return bb


def rope_manual(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv3 RoPE from the spec formula on patch rows t (B, heads, h*w, d_h), rotate-half convention."""
    dh = t.shape[-1]
    periods = 100.0 ** (2 * torch.arange(dh // 4, dtype=torch.float64) / (dh // 2))
    ys = 2 * (torch.arange(h, dtype=torch.float64) + 0.5) / h - 1
    xs = 2 * (torch.arange(w, dtype=torch.float64) + 0.5) / w - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(h * w, 2)
    angles = 2 * math.pi * coords[:, :, None] / periods  # (hw, 2, dh/4)
    angles = angles.flatten(1).tile(2).float()  # (hw, dh): [y, x] concatenated, tiled twice
    x1, x2 = t.chunk(2, -1)
    return t * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def manual_attention(bb, x: torch.Tensor, block: int) -> torch.Tensor:
    """softmax(q kᵀ/√d_h) of ``block`` from its hooked ``norm1`` output and the block's own weights."""
    blk = bb.model.blocks[block]
    got = {}
    hd = blk.norm1.register_forward_hook(lambda m, a, out: got.update(y=out))
    with torch.no_grad():
        bb.forward_features(x)
    hd.remove()
    y = got["y"].float()
    attn = blk.attn
    W = attn.qkv.weight
    if getattr(attn, "q_bias", None) is not None:  # timm DINOv3: q_bias, zero k bias, v_bias
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:
        bias = attn.qkv.bias
    B, N, D = y.shape
    nh = bb.num_heads
    q, k, _ = (y @ W.T + bias).reshape(B, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
    if bb.family == "dinov3":
        P = bb.num_prefix_tokens
        h, w = x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size
        q = torch.cat([q[:, :, :P], rope_manual(q[:, :, P:], h, w)], 2)
        k = torch.cat([k[:, :, :P], rope_manual(k[:, :, P:], h, w)], 2)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // nh), -1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [0, -1])
def test_attention_equals_manual_softmax(bb, shape, block):
    p = bb.patch_size
    x = torch.randn(2, 3, shape[0] * p, shape[1] * p)
    a = bb.attention(x, block=block)
    full = bb.attention(x, block=block, full=True)
    manual = manual_attention(bb, x, block)
    P = bb.num_prefix_tokens
    ones = torch.ones(2, bb.num_heads)
    assert a.cls.shape == (2, bb.num_heads, *shape) and a.cls.dtype == torch.float32
    assert a.prefix.shape == (2, bb.num_heads, P) and a.block == block % bb.depth and a.grid == shape
    torch.testing.assert_close(full.full.sum(-1), torch.ones_like(full.full.sum(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.cls.sum((-2, -1)) + a.prefix.sum(-1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.full, manual, atol=1e-5, rtol=0)
    # registers never in cls: it is exactly the CLS row over patch keys
    torch.testing.assert_close(a.cls.flatten(2), manual[:, :, 0, P:], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.prefix, manual[:, :, 0, :P], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.cls, full.cls, atol=1e-5, rtol=0)  # path A == path B
    torch.testing.assert_close(a.renormalized().sum((-2, -1)), ones, atol=1e-5, rtol=0)


def test_forward_with_attention_is_one_pass_and_changes_nothing(bb):
    p = bb.patch_size
    x = torch.randn(1, 3, 4 * p, 6 * p)
    with torch.no_grad():
        ref = bb.forward_features(x)
        feats, att = bb(x, attention_block=0)
    assert torch.equal(feats.patch, ref.patch)
    torch.testing.assert_close(att.cls, bb.attention(x, block=0).cls, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.equal(bb.forward_features(x).patch, ref.patch)


def _hook_counts(bb):
    return [(len(b.attn._forward_pre_hooks), len(b.attn.attn_drop._forward_pre_hooks), len(b._forward_hooks))
            for b in bb.model.blocks]


def test_flags_and_hooks_restored_also_after_error(bb):
    p = bb.patch_size
    x = torch.randn(1, 3, 4 * p, 4 * p)
    flags = [b.attn.fused_attn for b in bb.model.blocks]
    hooks = _hook_counts(bb)
    bb.attention(x, block=-1, full=True)
    bb.facets(x, block=-1)
    assert [b.attn.fused_attn for b in bb.model.blocks] == flags and _hook_counts(bb) == hooks

    def boom(m, args):
        raise RuntimeError("boom")

    h = bb.model.blocks[0].register_forward_pre_hook(boom)
    try:
        for call in (lambda: bb.attention(x, -1, full=True), lambda: bb.attention(x, -1), lambda: bb.facets(x, -1),
                     lambda: bb(x, attention_block=-1)):
            with pytest.raises(RuntimeError, match="boom"):
                call()
            assert [b.attn.fused_attn for b in bb.model.blocks] == flags
    finally:
        h.remove()
    assert _hook_counts(bb) == hooks


def test_attention_is_float32_under_autocast(bb):
    p = bb.patch_size
    x = torch.randn(1, 3, 4 * p, 4 * p)
    ref = bb.attention(x, block=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = bb.attention(x, block=-1)
    assert a.cls.dtype == torch.float32
    torch.testing.assert_close(a.cls.sum((-2, -1)) + a.prefix.sum(-1), torch.ones(1, bb.num_heads),
                               atol=1e-5, rtol=0)
    assert (a.cls - ref.cls).abs().max() < 0.05  # bf16 residual stream, f32 attention


@pytest.mark.parametrize("shape", SHAPES)
def test_facets(bb, shape):
    p = bb.patch_size
    x = torch.randn(2, 3, shape[0] * p, shape[1] * p)
    post = bb.facets(x, block=-1, rope="post")
    pre = bb.facets(x, block=-1, rope="pre")
    full = bb.attention(x, block=-1, full=True).full
    q, k = post["q"], post["k"]
    N = bb.num_prefix_tokens + shape[0] * shape[1]
    d = bb.embed_dim // bb.num_heads
    assert q.shape == (2, bb.num_heads, N, d) and pre["tokens"].shape == (2, N, bb.embed_dim)
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1), full, atol=1e-5, rtol=0)
    if bb.family == "dinov3":
        assert not torch.allclose(pre["q"], post["q"])
        P = bb.num_prefix_tokens
        torch.testing.assert_close(post["k"][:, :, P:], rope_manual(pre["k"][:, :, P:], *shape), atol=1e-5, rtol=0)
    else:
        assert torch.equal(pre["q"], post["q"]) and torch.equal(pre["k"], post["k"])
    assert torch.equal(pre["v"], post["v"])
    assert pre.patches("k").shape == (2, *shape, bb.embed_dim) and pre.cls("q").shape == (2, bb.embed_dim)
    torch.testing.assert_close(pre.patches("k")[:, 0, 0].reshape(2, bb.num_heads, d),
                               pre["k"][:, :, bb.num_prefix_tokens], atol=0, rtol=0)
    with torch.no_grad():
        f = bb.forward_features(x)
    normed = bb.model.norm(pre["tokens"])  # last block output + final norm == forward_features, prefix included
    P = bb.num_prefix_tokens
    torch.testing.assert_close(normed[:, P:], f.flat(), atol=1e-6, rtol=0)
    torch.testing.assert_close(normed[:, 0], f.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(normed[:, 1:P], f.registers, atol=1e-6, rtol=0)


def test_k_facet_equals_qkv_hook_dino():
    bb = load_backbone("tiny_dino", weights="random").eval()
    x = torch.randn(1, 3, 64, 96)
    got = {}
    h = bb.model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, out: got.update(qkv=out))
    with torch.no_grad():
        bb.forward_features(x)
    h.remove()
    B, N, _ = got["qkv"].shape
    k = got["qkv"].reshape(B, N, 3, bb.num_heads, -1).permute(2, 0, 3, 1, 4)[1]
    assert torch.equal(bb.facets(x, block=1, which=("k",))["k"], k)


def test_bad_block_and_rope_args(bb):
    x = torch.randn(1, 3, 4 * bb.patch_size, 4 * bb.patch_size)
    with pytest.raises(IndexError, match="out of range"):
        bb.attention(x, block=bb.depth)
    with pytest.raises(ValueError, match="rope"):
        bb.facets(x, rope="mid")
