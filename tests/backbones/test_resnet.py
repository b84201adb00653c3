"""ResNet-50 behind the dense contract (docs/backbones.md)."""

import pytest
import torch

from dinokit.backbones import AttentionUnavailableError, load_backbone


@pytest.fixture(scope="module")
def r50():
    return load_backbone("resnet50", weights="random").eval()


def test_features_equal_timm_forward_features(r50):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        f = r50.forward_features(x)
        ref = r50.model.forward_features(x)
    assert torch.equal(f.patch, ref.permute(0, 2, 3, 1))
    assert f.grid == (2, 3) and f.patch_size == 32 and f.cls is None and f.registers.shape == (1, 0, 2048)
    torch.testing.assert_close(f.pooled(), ref.mean((2, 3)))
    assert r50.embed_dim == 2048 and r50.num_registers == 0 and r50.position_embedding(2, 3) is None


def test_intermediate_stages(r50):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stages = r50.intermediate_layers(x, 4)
        last = r50.forward_features(x)
    assert [s.patch_size for s in stages] == [4, 8, 16, 32] and [s.layer for s in stages] == [0, 1, 2, 3]
    assert [s.patch.shape[-1] for s in stages] == [256, 512, 1024, 2048]
    assert stages[1].grid == (8, 8)
    assert torch.equal(stages[-1].patch, last.patch)
    assert [s.layer for s in r50.intermediate_layers(x, [0, -1])] == [0, 3]


def test_attention_and_facets_raise(r50):
    x = torch.randn(1, 3, 64, 64)
    for call in (lambda: r50.attention(x), lambda: r50.facets(x), lambda: r50(x, attention_block=-1)):
        with pytest.raises(AttentionUnavailableError, match="resnet50 has no attention; attention maps are defined "
                                                            "for ViT backbones"):
            call()


def test_num_classes_and_freeze_bn(tmp_path):
    bb = load_backbone("resnet10t", weights="random", num_classes=10, freeze_bn=True)
    assert bb.model.fc.out_features == 10
    bn = bb.model.bn1
    before = bn.running_mean.clone()
    bb.train()
    assert bb.training and bb.model.layer1.training and not bn.training
    bb.forward_features(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)
    plain = load_backbone("resnet10t", weights="random").train()
    assert plain.model.bn1.training


def test_torchvision_file_drops_fc_by_class_count(tmp_path):
    src = load_backbone("resnet18", weights="random", num_classes=1000).eval()
    torch.save(src.model.state_dict(), tmp_path / "resnet18-tv.pth")
    bb = load_backbone("resnet18", weights=str(tmp_path / "resnet18-tv.pth")).eval()
    assert bb.weights_info["layout"] == "torchvision" and "fc.* (2 tensors)" in bb.weights_info["dropped"]
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(bb.forward_features(x).patch, src.forward_features(x).patch)
    same = load_backbone("resnet18", weights=str(tmp_path / "resnet18-tv.pth"), num_classes=1000)
    assert torch.equal(same.model.fc.weight, src.model.fc.weight)
    fresh = load_backbone("resnet18", weights=str(tmp_path / "resnet18-tv.pth"), num_classes=5)
    assert fresh.model.fc.out_features == 5
