import pytest
import torch
from torch import nn

from dinokit.backbones import load_backbone
from dinokit.viz.erf import default_erf_layers, effective_receptive_field, plot_erf, select_layers, token_centre


def _nonzero(m: torch.Tensor) -> torch.Tensor:
    return m > 0


def test_single_3x3_conv_is_nonzero_exactly_on_the_central_window():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    maps = effective_receptive_field(conv, torch.randn(2, 3, 9, 9), ["0"])
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[3:6, 3:6] = True
    assert torch.equal(_nonzero(maps["0"]), expected)


def test_patch_embedding_conv_covers_the_central_patch_only():
    p = 4
    net = nn.Sequential(nn.Conv2d(3, 8, p, stride=p))
    m = effective_receptive_field(net, torch.randn(3, 3, 5 * p, 5 * p), ["0"])["0"]
    expected = torch.zeros(5 * p, 5 * p, dtype=torch.bool)
    expected[2 * p:3 * p, 2 * p:3 * p] = True
    assert torch.equal(_nonzero(m), expected)


def _tiny_vit():
    return load_backbone("vit_small_patch16_224", "random",
                         model_kwargs=dict(patch_size=4, img_size=32, embed_dim=32, depth=2, num_heads=2))


def test_tiny_vit_erf_extends_beyond_its_patch_and_patch_embed_does_not():
    bb = _tiny_vit()
    maps = effective_receptive_field(bb, torch.randn(2, 3, 32, 32), ["patch_embed", "blocks.1"])
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[16:20, 16:20] = True  # the central token (4, 4) of the 8x8 grid
    assert torch.equal(_nonzero(maps["patch_embed"]), inside)
    assert bool(_nonzero(maps["blocks.1"])[~inside].any())
    assert bb.training  # mode restored (load_backbone returns a module in training mode)


def test_non_square_token_grid_centre():
    assert token_centre((3, 5)) == (1, 2)
    bb = _tiny_vit()
    m = effective_receptive_field(bb, torch.randn(1, 3, 12, 20), ["patch_embed"])["patch_embed"]
    expected = torch.zeros(12, 20, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(_nonzero(m), expected)


def test_vit_with_registers_drops_prefix_tokens():
    bb = load_backbone("tiny_dinov2_reg", "random")
    x = torch.randn(1, 3, 3 * 14, 5 * 14)
    m = effective_receptive_field(bb, x, ["blocks.0.mlp.fc1", "blocks.1"])
    assert set(m) == {"blocks.0.mlp.fc1", "blocks.1"} and all(v.shape == (42, 70) for v in m.values())


def test_independent_of_batch_composition():
    bb = _tiny_vit()
    a, b = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    both = effective_receptive_field(bb, torch.cat([a, b]), ["blocks.1"], reduce="sum")["blocks.1"]
    sa = effective_receptive_field(bb, a, ["blocks.1"], reduce="sum")["blocks.1"]
    sb = effective_receptive_field(bb, b, ["blocks.1"], reduce="sum")["blocks.1"]
    torch.testing.assert_close(both, sa + sb, rtol=1e-4, atol=1e-7)


def test_attention_matrix_layer_raises_and_default_layers(tmp_path):
    bb = _tiny_vit()
    assert default_erf_layers(bb) == ["patch_embed", "blocks.0", "blocks.1"]
    bb.model.blocks[0].attn.fused_attn = False
    with pytest.raises(ValueError, match="blocks.0.attn.attn_drop"):
        effective_receptive_field(bb, torch.randn(1, 3, 32, 32), ["blocks.0.attn.attn_drop"])
    with pytest.raises(ValueError, match="no module"):
        select_layers(bb, ["nothing*"])
    maps = effective_receptive_field(bb, torch.randn(1, 3, 32, 32))
    path = plot_erf(tmp_path / "erf.png", maps, log=True)
    assert path.stat().st_size > 0


def test_resnet_like_default_layers():
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.layer1 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.layer1(self.conv1(x))

    r = R()
    assert default_erf_layers(r) == ["conv1", "layer1"]
    m = effective_receptive_field(r, torch.randn(1, 3, 11, 11))
    assert int(_nonzero(m["layer1"]).sum()) == 25  # two stacked 3x3 convs: a 5x5 window
