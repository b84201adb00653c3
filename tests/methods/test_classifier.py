"""Classification recipe (crops.md §4): groups, schedules, EMA, BN mode, crop datasets, a tiny fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinokit.data import crops as C
from dinokit.data.synthetic import SyntheticScenes
from dinokit.methods import classifier as K
from dinokit.methods.classifier import lightning as KL

TINY = dict(channels=(8, 16, 32, 64), stem_width=8)


def tiny_model(n: int = 5) -> nn.Module:
    return K.build_classifier("resnet10t", n, "random", TINY)


def test_weight_decay_groups_are_exact_disjoint_and_complete():
    m = tiny_model()
    decay, no_decay = K.param_groups(m, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids_d, ids_n = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert not ids_d & ids_n and ids_d | ids_n == {id(p) for p in m.parameters()}
    for name, p in m.named_parameters():
        assert (id(p) in ids_n) == (name.endswith("bias") or ".bn" in name or p.ndim <= 1), name
    head = m.get_classifier()
    assert torch.count_nonzero(head.bias) == 0


def test_step_schedule_endpoints_and_cosine():
    assert K.step_lr(0) == pytest.approx(2e-4)
    assert K.step_lr(199) == pytest.approx(1.161e-5, rel=1e-3)
    assert (1e-5 / 2e-4) ** (10 / 200) == pytest.approx(0.86089, rel=1e-5)
    assert K.step_lr(9) == K.step_lr(0) and K.step_lr(10) < K.step_lr(9)
    assert K.cosine_lr(0, 100, warmup_steps=5) == pytest.approx(2e-6)
    assert K.cosine_lr(5, 100, warmup_steps=5) == pytest.approx(2e-4)
    assert K.cosine_lr(100, 100) == pytest.approx(1e-5)
    # the Lightning module's optimiser carries the same step schedule
    mod = KL.ClassifierModule(tiny_model(), K.RecipeConfig(epochs=200))
    opt = mod.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    for _ in range(199):
        opt["optimizer"].step()
        sched.step()
    assert opt["optimizer"].param_groups[0]["lr"] == pytest.approx(1.161e-5, rel=1e-3)


def test_ema_matches_the_closed_form_and_averages_bn_buffers():
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    ema = K.EmaEvery(net, decay=0.9, every=32)
    n_batches, epochs = 70, 2
    expected, first = None, True
    for _ in range(epochs):
        for i in range(n_batches):
            with torch.no_grad():
                net[0].weight.fill_(float(i))
                net[1].running_mean.fill_(2.0 * i)
            if ema.maybe_update(net, i):
                expected = float(i) if first else 0.9 * expected + 0.1 * i
                first = False
    assert ema.updates == epochs * math.ceil(n_batches / 32)
    assert ema.module[0].weight.item() == pytest.approx(expected)
    assert ema.module[1].running_mean.item() == pytest.approx(2 * expected)


def test_bn_check_callback_raises_on_frozen_bn_unless_reproducing():
    mod = KL.ClassifierModule(tiny_model())
    cb = KL.BatchNormTrainCheck()
    mod.model.train()
    cb.on_train_batch_start(None, mod, None, 0)
    K.set_bn_eval(mod.model)
    with pytest.raises(RuntimeError, match="bn_freeze_after_epoch"):
        cb.on_train_batch_start(None, mod, None, 0)
    mod.cfg.bn_freeze_after_epoch = 1
    cb.on_train_batch_start(None, mod, None, 0)


@pytest.fixture(scope="module")
def scenes():
    return K.SceneSource(SyntheticScenes(12, (64, 64), seed=0, fine_grained=True))


@pytest.mark.parametrize("mode", ["rrc", "localized"])
def test_crop_dataset_views(scenes, mode):
    ds = K.CropDataset(scenes, True, mode, 32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    xv, _ = K.CropDataset(scenes, False, mode, 32)[1]
    assert xv.shape == (3, 32, 32)


def test_localized_crop_contains_the_main_object(scenes):
    t = C.LocalizedRandomResizedCrop(64, thr=1.0, return_params=True)
    for i in range(len(scenes)):
        s = scenes[i]
        _, b, (top, left, h, w) = t(torch.from_numpy(s.image).permute(2, 0, 1), s.box)
        x, y, bw, bh = s.box
        assert left <= x and top <= y and left + w >= x + bw - 1 and top + h >= y + bh - 1
        assert b[0] >= -1e-4 and b[1] >= -1e-4 and b[0] + b[2] <= 64 + 1e-4 and b[1] + b[3] <= 64 + 1e-4


def test_missing_box_raises_or_falls_back_to_rrc(scenes):
    table = {k: [1, 1, 10, 10] for k in scenes.ids[1:]}
    with pytest.raises(ValueError, match="missing_box='rrc'"):
        K.CropDataset(scenes, True, "localized", 32, boxes=table)
    ds = K.CropDataset(scenes, True, "localized", 32, boxes=table, missing_box="rrc")
    assert ds.missing_ids == [scenes.ids[0]]
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="negative"):
        K.CropDataset(scenes, True, "localized", 32, boxes={k: [-3, 1, 10, 10] for k in scenes.ids})[0]


def test_density_online_batch_goes_through_the_module(scenes):
    from dinokit.backbones import load_backbone

    ds = K.CropDataset(scenes, True, "density", 32, canvas=64)
    canvas, valid, y = ds[0]
    assert canvas.shape == (3, 64, 64) and canvas.dtype == torch.uint8 and valid.tolist() == [64, 64]
    bb = load_backbone("tiny_dino", weights="random")
    dens = C.OnlineDensityCrops(bb, 32, C.DensityConfig(att_size=64, canvas=64))
    mod = KL.ClassifierModule(tiny_model(), density=dens)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])

    class _T:
        training = True

    mod._trainer = _T()  # what Lightning sets during fit
    x, yb = mod.on_after_batch_transfer(batch, 0)
    assert x.shape == (4, 3, 32, 32) and yb.shape == (4,)
    assert not any(p.requires_grad for p in dens.backbone.parameters())


def test_tiny_fit_logs_raw_and_ema_accuracy(scenes, tmp_path):
    val = K.SceneSource(SyntheticScenes(8, (64, 64), seed=1, fine_grained=True))
    cfg = K.RecipeConfig(lr=0.01, epochs=2, ema_every=2)
    m, mod = KL.fit_classifier(K.CropDataset(scenes, True, "localized", 32), K.CropDataset(val, False, "rrc", 32),
                               tiny_model(), cfg, batch_size=4, out=tmp_path)
    assert set(m) >= {"val/acc", "val/acc_ema", "running_acc", "ema_updates"}
    assert m["ema_updates"] == 2 * math.ceil(3 / 2)
    assert 0 <= m["val/acc"] <= 1 and len(mod.acc_history) == 2
    assert m["running_acc"] == pytest.approx(np.mean(mod.acc_history))
    again = K.build_classifier("resnet10t", 5, str(tmp_path / "ema.safetensors"), TINY)  # stage 2 from stage 1 EMA
    assert torch.equal(again.get_classifier().weight, mod.ema.module.get_classifier().weight)


def test_cub_layout_loads_through_the_same_code(tmp_path):
    from dinokit.data.layouts import write_cub_layout

    write_cub_layout(tmp_path / "cub", n_train=6, n_test=4, size=(48, 64))
    src = K.CUBSource(tmp_path / "cub", "train", "official")
    assert len(src) == 6 and all(i.isdigit() for i in src.ids)
    s = src[0]
    assert s.box is not None and len(s.box) == 4
    x, _ = K.CropDataset(src, True, "localized", 32)[0]
    assert x.shape == (3, 32, 32)
