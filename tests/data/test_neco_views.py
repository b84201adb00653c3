"""NeCo multi-crop views: box bookkeeping, overlap rule, capped resampling, determinism, bad input."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from dinokit.data.synthetic import SyntheticScenes
from dinokit.methods.neco.views import (
    NeCoDataset,
    NeCoViews,
    box_area,
    box_intersection,
    crop_intersection_boxes,
    neco_collate,
)


def test_worked_example() -> None:
    boxes = torch.tensor([[0, 0, 60, 40], [10, 10, 90, 70], [30, 20, 100, 80]], dtype=torch.float32)
    gc, all_ = crop_intersection_boxes(boxes, [518, 518, 98])
    assert gc.shape == (2, 3, 4) and all_.shape == (3, 2, 4) and gc.dtype == torch.float32
    assert torch.allclose(gc[0, 2], torch.tensor([259.0, 259.0, 518.0, 518.0]), atol=1e-4)
    assert torch.allclose(all_[2, 0], torch.tensor([0.0, 0.0, 42.0, 32.6667]), atol=1e-4)
    for g in range(2):
        assert torch.equal(gc[g, g], torch.tensor([0.0, 0.0, 518.0, 518.0]))
    # hand-computed: global 1 (10, 10, 90, 70) vs local (30, 20, 100, 80): I = (30, 20, 90, 70)
    # in global 1's frame (80 x 60 px -> 518): x = 518 * (30 - 10) / 80 = 129.5, y = 518 * (20 - 10) / 60, ...
    assert torch.allclose(gc[1, 2], torch.tensor([129.5, 518 * 10 / 60, 518.0, 518.0]), atol=1e-4)
    # and in the local's frame (70 x 60 px -> 98): (0, 0, 98 * 60 / 70, 98 * 50 / 60)
    assert torch.allclose(all_[2, 1], torch.tensor([0.0, 0.0, 98 * 60 / 70, 98 * 50 / 60]), atol=1e-4)
    assert torch.equal(all_[0, 1], gc[0, 1] * 0 + all_[0, 1])  # shapes consistent; gc[0, 1] is the same box
    assert torch.allclose(all_[1, 0], gc[1, 0])  # global/global pair: the same intersection seen from both sides


def test_overlap_rule_over_random_sizes() -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    views = NeCoViews(sizes=(518, 98))
    for _ in range(2000):
        side = int(rng.integers(16, 4001))
        aspect = float(np.exp(rng.uniform(0, np.log(10))))
        other = int(np.clip(round(side / aspect), 16, 4000))
        W, H = (side, other) if rng.random() < 0.5 else (other, side)
        boxes, n_fb, n_unsat = views.draw_boxes(W, H)
        t = int(0.01 * W * H)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        if n_unsat == 0:
            assert box_area(box_intersection(boxes[1], boxes[0])) > 2 * t
            for k in range(2, 6):
                for g in range(2):
                    assert box_area(box_intersection(boxes[k], boxes[g])) > t
        gc, all_ = crop_intersection_boxes(boxes, views.crop_sizes)
        for b in (gc, all_):
            assert (b[..., 2] > b[..., 0]).all() and (b[..., 3] > b[..., 1]).all()


def test_forced_failure_uses_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def disjoint(img, scale, ratio):  # global 0 in the top-left corner, every later draw in the bottom-right one
        calls["n"] += 1
        return (0, 0, 50, 50) if calls["n"] == 1 else (90, 90, 10, 10)

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(disjoint))
    views = NeCoViews(sizes=(32, 16), max_resample=7)
    out = views(np.full((100, 100, 3), 128, np.uint8))
    assert calls["n"] == 1 + 5 * 8  # 8 draws (1 + max_resample) for each of the 5 later crops
    assert out["n_fallback"] == 5 and out["n_unsatisfied"] == 0
    assert all(torch.equal(out["boxes"][k], torch.tensor([0.0, 0, 50, 50])) for k in range(6))


def test_same_seed_same_boxes_and_pixels() -> None:
    img = SyntheticScenes(1, (80, 96), seed=3)[0].image
    views = NeCoViews(sizes=(64, 32))
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        random.seed(5)
        outs.append(views(img))
    assert torch.equal(outs[0]["boxes"], outs[1]["boxes"])
    assert all(torch.equal(a, b) for a, b in zip(outs[0]["crops"], outs[1]["crops"]))


def test_small_image_is_upsampled_with_a_log(caplog: pytest.LogCaptureFixture) -> None:
    import dinokit.methods.neco.views as nv

    nv._WARNED_SMALL = False
    with caplog.at_level(logging.WARNING, logger="dinokit.methods.neco.views"):
        out = NeCoViews(sizes=(64, 32))(np.full((12, 20, 3), 50, np.uint8))
    assert "smaller than the 32-px local crops" in caplog.text
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 4


def test_dataset_and_collate() -> None:
    scenes = SyntheticScenes(3, (64, 64), seed=0)
    ds = NeCoDataset(scenes, NeCoViews(sizes=(64, 32)))
    items = [ds[0], ds[1], {"error": "truncated file", "id": "bad.jpg"}, ds[2]]
    batch = neco_collate(items)
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 4
    assert batch["gc"].shape == (3, 2, 6, 4) and batch["all"].shape == (3, 6, 2, 4)
    assert batch["n_bad"] == 1 and batch["bad"] == ["bad.jpg"]
    assert batch["n_fallback"].shape == (3,)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2 global"):
        NeCoViews(crops=(3, 4))
    with pytest.raises(ValueError, match="scale"):
        NeCoViews(scale_min=(0.5, 0.3), scale_max=(0.4, 0.5))
    with pytest.raises(TypeError, match="PIL image"):
        NeCoViews()("not an image")
    with pytest.raises(ValueError, match="uint8"):
        NeCoViews()(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="unreadable"):
        neco_collate([{"error": "x", "id": "a.jpg"}])
