import pytest
import torch

from dinokit.backbones import load_backbone

TINY = ["tiny_dino", "tiny_dinov2", "tiny_dinov2_reg", "tiny_dinov3"]


@pytest.fixture(scope="module", params=TINY)
def bb(request):
    return load_backbone(request.param, weights="random").eval()


def test_non_square_grid(bb):
    p = bb.patch_size
    x = torch.randn(2, 3, 4 * p, 6 * p)
    f = bb.forward_features(x)
    assert f.grid == (4, 6) and f.patch.shape == (2, 4, 6, bb.embed_dim)
    assert f.registers.shape == (2, bb.num_registers, bb.embed_dim)


def test_grid_spec_examples():
    assert load_backbone("tiny_dino", "random").grid_size(224, 336) == (14, 21)
    assert load_backbone("tiny_dinov2", "random").grid_size(224, 336) == (16, 24)
    assert load_backbone("tiny_dinov3", "random").grid_size(96, 160) == (6, 10)


def test_attention_rows_and_manual_softmax(bb):
    p = bb.patch_size
    x = torch.randn(2, 3, 3 * p, 5 * p)
    a = bb.attention(x, block=-1)
    full = bb.attention(x, block=-1, full=True)
    assert torch.allclose(a.cls.sum((-2, -1)) + a.prefix.sum(-1), torch.ones(2, bb.num_heads), atol=1e-5)
    assert torch.allclose(full.full.sum(-1), torch.ones_like(full.full.sum(-1)), atol=1e-5)
    assert torch.allclose(a.cls, full.cls, atol=1e-5)  # path A == path B
    fac = bb.facets(x, block=-1, rope="post")
    q, k = fac["q"], fac["k"]
    manual = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1)
    assert torch.allclose(manual, full.full, atol=1e-5)
    P = bb.num_prefix_tokens
    assert a.cls.shape == (2, bb.num_heads, 3, 5)
    assert torch.allclose(a.cls.flatten(2), manual[:, :, 0, P:], atol=1e-5)  # registers excluded


def test_size_policy_error_names_sizes():
    bb = load_backbone("tiny_dino", "random")
    with pytest.raises(ValueError, match=r"224 or 240 by 336 or 352"):
        bb.forward_features(torch.randn(1, 3, 230, 340))


def test_crop_policy_equals_cropped_forward():
    bb = load_backbone("tiny_dino", "random", size_policy="crop").eval()
    x = torch.randn(1, 3, 230, 340)
    assert torch.equal(bb.forward_features(x).patch, bb.forward_features(x[..., :224, :336]).patch)


def test_intermediate_last_equals_forward(bb):
    x = torch.randn(1, 3, 2 * bb.patch_size, 3 * bb.patch_size)
    assert torch.equal(bb.intermediate_layers(x, [-1])[0].patch, bb.forward_features(x).patch)
    assert len(bb.intermediate_layers(x, 2)) == 2


def test_unsupported_and_unknown_names():
    with pytest.raises(ValueError, match=r"no timm architecture.*dinov3_vits16.*resnet50"):
        load_backbone("dinov3_vitl16plus", weights="random")
    with pytest.raises(ValueError, match="unknown backbone 'vit_nonexistent'"):
        load_backbone("vit_nonexistent", weights="random")
    with pytest.raises(ValueError, match="which='ema'"):
        load_backbone("tiny_dino", weights="random", which="ema")
