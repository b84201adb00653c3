"""RASA Lightning stage trainer on a frozen tiny backbone: one step touches only the probe; a short fit."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinokit.backbones import load_backbone
from dinokit.data.synthetic import SyntheticScenes
from dinokit.methods.rasa import (
    ImagesOnly,
    RASAHead,
    chance_mse,
    collate_images,
    entropy_stage_metrics,
    load_rasa_head,
    rasa_train_transform,
    rasa_val_transform,
)
from dinokit.methods.rasa.lightning import RASAStageModule, fit_rasa_backbone


@pytest.fixture(scope="module")
def bb():
    return load_backbone("tiny_dino", weights="random").eval()


def _trainer(**kw):
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    opts.update(kw)
    return L.Trainer(**opts)


def test_one_step_changes_only_the_probe(bb):
    head = RASAHead(bb.embed_dim, stage_weights=torch.randn(2, 2, bb.embed_dim) * 0.1)
    head.new_probe(401)
    sw0, p0 = head.stage_weights.clone(), head.probe.detach().clone()
    params0 = {k: v.clone() for k, v in bb.state_dict().items()}
    module = RASAStageModule(bb, head, lr=1e-2)
    images = torch.randn(4, 3, 64, 64)
    _trainer(max_steps=1).fit(module, DataLoader([images[i] for i in range(4)], batch_size=4))
    assert not torch.equal(head.probe.detach().cpu(), p0)
    assert torch.equal(head.stage_weights.cpu(), sw0)
    assert all(torch.equal(v, params0[k]) for k, v in bb.state_dict().items())
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.training


def test_train_transform_shapes_and_std_typo():
    img = np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)
    t = rasa_train_transform(crop_size=64)
    out = ImagesOnly([img], t)[0]
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    v = ImagesOnly([img], rasa_val_transform(48))[0]
    assert v.shape == (3, 48, 48)
    plain = rasa_train_transform(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), photometric=False, geometric=False)
    typo = rasa_train_transform(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), photometric=False, geometric=False,
                                normalize_std_typo=True)
    sq = np.full((64, 64, 3), 200, np.uint8)
    a, b = plain(torch.from_numpy(sq).permute(2, 0, 1)), typo(torch.from_numpy(sq).permute(2, 0, 1))
    assert torch.allclose(a[:2], b[:2]) and not torch.allclose(a[2], b[2])
    assert collate_images([None, out]).shape == (1, 3, 64, 64)


def test_short_fit_writes_stages_and_cosines(bb, tmp_path):
    scenes = SyntheticScenes(8, (64, 64), seed=3)
    train = ImagesOnly(scenes, rasa_train_transform(64, photometric=False))
    val = ImagesOnly(SyntheticScenes(4, (64, 64), seed=4), rasa_val_transform(64))
    res = fit_rasa_backbone(bb, train, val, batch_size=4, epochs=1, lr=1e-2, max_stages=2, out_dir=tmp_path,
                            accelerator="cpu", stage_metrics=entropy_stage_metrics(64, k=8))
    assert res.head.n_stages == 2 and res.stop_reason == "max_stages" and len(res.records) == 3
    assert torch.equal(load_rasa_head(tmp_path / "stage02.pth").stage_weights, res.head.stage_weights)
    m = res.records[0].metrics
    assert {"val/cos_pe_removed", "val/cos_pe_residual", "val/cos_x_removed", "val/cos_x_residual"} <= set(m)
    assert "val/feat-debiased/spatial_entropy/se1/in64/k8/se" in m
    assert all(np.isfinite(r.mse) and abs(r.chance - chance_mse(4, 4)) < 1e-9 for r in res.records)  # p16 at 64 px
