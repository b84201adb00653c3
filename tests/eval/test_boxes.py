"""Box metrics and CorLoc against hand-computed cases (docs/eval/boxes.md item 11)."""

import numpy as np
import pytest
import torch

from dinokit.eval.boxes import (
    box_aiou,
    box_iop,
    box_iou,
    corloc,
    crop_to_xyxy,
    grid_box_to_xyxy,
    maiou,
    miou_box,
    voc_to_xyxy,
    xywh_to_xyxy,
)


def test_iou_identities():
    b = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [2, 0, 4, 2], [5, 5, 6, 6]], float)
    iou = box_iou(b, b)
    assert np.allclose(np.diag(iou), 1) and np.allclose(iou, iou.T)
    assert iou[0, 2] == 0 and iou[0, 3] == 0  # edge-touching, disjoint
    assert iou[0, 1] == pytest.approx(1 / 7)
    assert box_aiou(b[:1], b[1:2])[0, 0] == pytest.approx(1 / 4)
    assert box_iop(b[:1], b[1:2])[0, 0] == pytest.approx(1 / 4)
    assert isinstance(box_iou(torch.tensor(b), torch.tensor(b)), torch.Tensor)
    assert box_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0] == 0  # empty union
    assert box_iou([0, 0, 2, 2], [1, 1, 2, 2], fmt="xywh")[0, 0] == pytest.approx(1 / 7)


def test_aiou_containment_and_converters():
    gt = np.array([[2, 2, 4, 4]], float)
    assert box_aiou(np.array([[0, 0, 10, 10]], float), gt)[0, 0] == 1.0
    assert box_aiou(np.array([[2, 2, 3, 3]], float), gt)[0, 0] == pytest.approx(1 / 4)
    assert voc_to_xyxy(np.array([1, 1, 50, 30], float)).tolist() == [0, 0, 50, 30]
    assert xywh_to_xyxy(np.array([1, 2, 3, 4], float)).tolist() == [1, 2, 4, 6]
    assert crop_to_xyxy(top=1, left=2, h=3, w=4) == (2, 1, 6, 4)
    assert grid_box_to_xyxy(0, 2, 1, 4, 16, height=30, width=60) == (16, 0, 60, 30)
    assert maiou([[0, 0, 10, 10], [2, 2, 3, 3]], [gt, gt]) == pytest.approx((1 + 0.25) / 2)
    assert miou_box([[2, 2, 4, 4]], [np.concatenate([gt, [[0, 0, 1, 1]]])]) == 1.0


def test_corloc_cases():
    pred, gt = np.array([0, 0, 2, 1], float), np.array([[0, 0, 2, 2]], float)
    assert box_iou(pred, gt)[0, 0] == 0.5
    assert corloc([pred], [gt])["corloc"] == 1.0
    assert corloc([pred], [gt], iou_mode="lost")["corloc"] == 0.0
    g = np.array([[0, 0, 10, 10]], float)
    r = corloc([[0, 0, 10, 10], [50, 50, 60, 60], [1, 1, 10, 10]], [g, g, g])
    assert r == {"corloc": pytest.approx(2 / 3), "n_images": 3, "n_hits": 2}
    empty = np.zeros((0, 4))
    assert corloc([[0, 0, 10, 10], [0, 0, 1, 1]], [g, empty], empty_gt="miss")["corloc"] == 0.5
    assert corloc([[0, 0, 10, 10], [0, 0, 1, 1]], [g, empty], empty_gt="skip")["corloc"] == 1.0
    two = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    hard = [np.array([True, False])]
    assert corloc([[0, 0, 10, 10]], [two], hard=hard, hard_mode="drop")["corloc"] == 0.0
    assert corloc([[0, 0, 10, 10]], [two], hard=hard, hard_mode="keep")["corloc"] == 1.0
    with pytest.raises(ValueError, match="one prediction per image"):
        corloc([[0, 0, 1, 1]], [g, g])
