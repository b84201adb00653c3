from contextlib import nullcontext

import numpy as np
import pytest
import torch

from dinokit.backbones.features import DenseFeatures
from dinokit.methods.seg_heads import (
    HEADS,
    build_head,
    dice_loss,
    eval_size,
    new_confusion,
    protocol_miou,
    segmentation_loss,
    update_confusion,
)

SMALL = {"setr_pup": {"channels": 8}, "aspp": {"channels": 8}, "setr_naive": {"channels": 8}}


def _n(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.filterwarnings("ignore:ASPP rates")
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("p", [8, 14, 16])
@pytest.mark.parametrize("grid", [(14, 14), (14, 20)])
def test_output_shape(head, p, grid):
    D, K = 16, 5
    m = build_head(head, D, K, p, **SMALL.get(head, {})).eval()
    x = torch.randn(1, *grid, D)
    with torch.no_grad():
        assert m(x).shape == (1, K, grid[0] * p, grid[1] * p)


@pytest.mark.parametrize("head", HEADS)
def test_input_forms_and_out_size(head):
    D, K, p, grid = 16, 5, 8, (3, 5)
    m = build_head(head, D, K, p, **SMALL.get(head, {})).eval()
    x = torch.randn(2, *grid, D)
    f = DenseFeatures(x, None, x.new_zeros(2, 0, D), grid, p, 0, image_size=(grid[0] * p, grid[1] * p))
    with pytest.warns(UserWarning) if head == "aspp" else nullcontext(), torch.no_grad():
        y = m(f)
        torch.testing.assert_close(m(x.flatten(1, 2), grid=grid), y)
        assert m(x, out_size=(33, 47)).shape == (2, K, 33, 47)
    assert y.shape == (2, K, 24, 40)


def test_parameter_counts():
    assert _n(build_head("linear_patch", 384, 21, 8)) == 517_440
    assert _n(build_head("linear_patch", 384, 21, 16)) == 2_069_760
    assert _n(build_head("setr_naive", 384, 21, 16)) == 156_693
    assert _n(build_head("setr_pup_linear", 384, 21, 16)) == 66_933
    assert _n(build_head("setr_pup_linear", 384, 21, 8)) == 57_621
    pup = build_head("setr_pup", 384, 21, 16)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in pup.modules()) == 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_head("setr_pup_linear", 384, 21, 16).modules())


def test_linear_patch_layout():
    m = build_head("linear_patch", 2, 1, 2)
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.bias.copy_(torch.arange(4.0))  # vector (p1, p2) = [[0, 1], [2, 3]]
    y = m(torch.zeros(1, 1, 2, 2))
    assert y[0, 0].tolist() == [[0, 1, 0, 1], [2, 3, 2, 3]]


def test_patch_size_mismatch_and_bad_inputs_raise():
    m = build_head("linear", 16, 3, 16)
    f = DenseFeatures(torch.randn(1, 4, 4, 16), None, torch.zeros(1, 0, 16), (4, 4), 14, 0, image_size=(56, 56))
    with pytest.raises(ValueError, match="patch size 16 but the backbone has patch size 14"):
        m(f)
    with pytest.raises(ValueError, match=r"image size \(60, 64\) does not match .* \(64, 64\)"):
        m(torch.randn(1, 4, 4, 16), image_size=(60, 64))
    with pytest.raises(ValueError, match="do not fill the grid"):
        m(torch.randn(1, 17, 16), grid=(4, 4))
    with pytest.raises(ValueError, match="unknown head"):
        build_head("fcn", 16, 3, 16)
    aspp = build_head("aspp", 16, 3, 16, channels=8).train()
    with pytest.raises(ValueError, match="at least 2"):
        aspp(torch.randn(1, 20, 20, 16))
    with pytest.warns(UserWarning, match="degenerate"):
        aspp(torch.randn(2, 8, 8, 16))


def test_losses_perfect_dice_and_ignored_pixels():
    target = torch.tensor([[[0, 1], [2, 255]]])
    perfect = torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 1e4
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(1, 4, 2, 2)
    other = logits.clone()
    other[..., 1, 1] = torch.randn(4) * 10  # change only the ignored pixel
    for loss in ("ce", "dice", "ce+dice"):
        assert segmentation_loss(logits, target, loss).item() == pytest.approx(
            segmentation_loss(other, target, loss).item(), abs=1e-6)
    # dice averages over present classes only: class 3 is absent
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 4).permute(0, 3, 1, 2).float()
    valid = (target != 255).float()[:, None]
    d = [2 * (probs * onehot * valid)[:, c].sum() / ((probs * valid)[:, c].sum() + (onehot * valid)[:, c].sum())
         for c in range(3)]
    assert dice_loss(logits, target).item() == pytest.approx(float(np.mean([1 - v for v in d])), rel=1e-5)
    with pytest.raises(ValueError, match="loss="):
        segmentation_loss(logits, target, "focal")


def test_protocols_on_a_hand_made_mask():
    # 4x4 mask: classes 0/1 and void (255) on the bottom row
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [255, 255, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float() * 10  # K = 3, class 2 never used
    cm = new_confusion(3, "orig")
    update_confusion(cm, logits, mask, "orig")
    # orig: void ignored; class 0: TP 5, FP 0, FN 2 -> 5/7; class 1: TP 5, FP 2, FN 0 -> 5/7; class 2 absent
    assert protocol_miou(cm, "orig") == pytest.approx(5 / 7)
    cm = new_confusion(3, "recvis224")
    update_confusion(cm, logits, mask, "recvis224", size=4)
    # recvis224: void -> background; bottom row gt 0, pred [1, 1, 0, 0]
    # class 0: TP 7, FP 0, FN 4 -> 7/11; class 1: TP 5, FP 4, FN 0 -> 5/9
    assert protocol_miou(cm, "recvis224") == pytest.approx((7 / 11 + 5 / 9) / 2)


def test_eval_size():
    assert eval_size(375, 500, 320, 16) == (320, 432)
    assert eval_size(64, 64, 64, 8) == (64, 64)
