"""Known answers of the streaming confusion matrix and the three matchings (docs/eval/index.md items 1-5)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinokit.eval.metrics import ConfusionMatrix, match_and_score, match_clusters, miou


def test_hand_computed_case():
    cm = ConfusionMatrix(2).update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    assert cm.numpy().tolist() == [[1, 1], [0, 2]]
    s = cm.compute("none")
    assert s["iou/0"] == pytest.approx(0.5) and s["iou/1"] == pytest.approx(2 / 3)
    assert s["miou"] == pytest.approx(7 / 12) and s["pixel_acc"] == pytest.approx(0.75)


def test_perfect_and_permuted():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(4, 16, 16))
    for m in ("none", "hungarian", "many_to_one"):
        assert miou(gt, gt, 5, matching=m) == 1.0
    perm = np.array([1, 2, 3, 4, 0])  # a derangement
    assert miou(gt, perm[gt], 5, matching="hungarian") == 1.0
    assert miou(gt, perm[gt], 5, matching="none") == 0.0


def test_split_into_three_clusters_many_to_one():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(2, 32, 32))
    pred = gt * 3 + rng.integers(0, 3, size=gt.shape)
    s = ConfusionMatrix(4, 12).update(gt, pred).compute("many_to_one")
    assert s["miou"] == 1.0 and s["bg_frac"] == pytest.approx(3 / 12)


def test_absent_class_and_ade_quirk():
    gt = np.array([0, 1, 1, 0])
    cm = ConfusionMatrix(3).update(gt, gt)
    assert cm.compute("none", absent="zero")["miou"] == pytest.approx(2 / 3)
    assert cm.compute("none", absent="nan")["miou"] == pytest.approx(1.0)
    lab = np.arange(151).repeat(3)
    assert miou(lab, lab, 151, ignore_index=0) == pytest.approx(150 / 151)


def test_ignore_ties_empty_and_errors():
    cm = ConfusionMatrix(3, ignore_index=255).update(np.array([0, 255, 2]), np.array([0, 1, 2]))
    assert cm.numpy().sum() == 2 and cm.numpy()[:, 1].sum() == 0
    conf = np.zeros((6, 3), dtype=np.int64)
    conf[2, 0] = conf[5, 0] = 4  # equal precision for classes 2 and 5 -> 2
    conf[1, 2] = 3  # cluster 1 empty -> 0
    assert match_clusters(conf, "many_to_one").tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="outside the class set"):
        ConfusionMatrix(3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="predicted ids"):
        ConfusionMatrix(3).update(np.array([0]), np.array([5]))
    gt = np.array([0, 1, 2, 2])
    s = ConfusionMatrix(3, 2).update(gt, np.array([0, 1, 1, 1])).compute("hungarian")
    assert s["iou/0"] == 1.0 and (s["iou/1"] == 0.0 or s["iou/2"] == 0.0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_streaming_equals_one_shot(seed, n_splits):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, size=200)
    gt[rng.random(200) < 0.1] = 255
    pred = rng.integers(0, 7, size=200)
    one = ConfusionMatrix(4, 7).update(gt, pred).numpy()
    cuts = np.sort(rng.integers(0, 200, size=n_splits))
    acc = ConfusionMatrix(4, 7)
    for g, p in zip(np.split(gt, cuts), np.split(pred, cuts), strict=True):
        acc.update(torch.from_numpy(g), torch.from_numpy(p))
    assert np.array_equal(acc.numpy(), one)
    for m in ("hungarian", "many_to_one"):
        # matching from C equals remapping pixels
        mp = match_clusters(one, m)
        assert match_and_score(one, m)["miou"] == pytest.approx(miou(gt, mp[pred], 4, matching="none"))
