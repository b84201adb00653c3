"""``dinokit rasa fit`` / ``dinokit rasa apply``: shards debiased, offline failure, a tiny synthetic fit."""

import json

import numpy as np
import pytest
import torch

from dinokit.backbones import WeightsUnavailableError
from dinokit.backbones.shards import load_feature_dir, read_shard, write_shard
from dinokit.commands.rasa import _crop_for_patch, apply, fit
from dinokit.methods.rasa import RASAHead, load_rasa_head

D = 32


def _shards(folder, n_shards=2, n=3, grid=(4, 5), dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_shards):
        t = {"patch": torch.randn(n, *grid, D).to(dtype), "cls": torch.randn(n, D), "registers": torch.randn(n, 4, D),
             "grid": torch.tensor(grid), "index": torch.arange(k * n, (k + 1) * n)}
        write_shard(folder / f"shard-{k:05d}.safetensors", t, [f"img{k}_{i}" for i in range(n)],
                    {"backbone": {"name": "tiny"}, "config": {}})
    (folder / "manifest.json").write_text(json.dumps({"shards": n_shards}))


def test_apply_debiases_patch_only(tmp_path):
    src = tmp_path / "feats"
    _shards(src)
    head = RASAHead(D, stage_weights=torch.randn(3, 2, D) / D**0.5)
    hp = head.save(tmp_path / "head.pth")
    assert apply(hp, src, tmp_path / "out") == 0
    a, b = load_feature_dir(src), load_feature_dir(tmp_path / "out")
    assert (b.patch - head(a.patch)).abs().max() <= 1e-5
    assert torch.equal(a.cls, b.cls) and torch.equal(a.registers, b.registers) and a.image_ids == b.image_ids
    assert (b.patch @ head.stage_weights[-1].T).abs().max() <= 1e-4
    _, _, meta = read_shard(tmp_path / "out" / "shard-00000.safetensors")
    assert meta["feature_transform"]["rasa_stages"] == 3 and (tmp_path / "out" / "manifest.json").is_file()
    assert apply(hp, src, tmp_path / "out") == 0  # resumable: already converted shards are skipped


def test_apply_keeps_dtype_and_rejects_bad_input(tmp_path):
    src = tmp_path / "f16"
    _shards(src, n_shards=1, dtype=torch.float16)
    head = RASAHead(D, stage_weights=torch.randn(2, 2, D) / D**0.5)
    hp = head.save(tmp_path / "head.safetensors", format="native")
    apply(hp, src, tmp_path / "o16")
    assert load_feature_dir(tmp_path / "o16").patch.dtype == torch.float16
    wrong = RASAHead(D + 1, stage_weights=torch.randn(2, 2, D + 1)).save(tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="D = 32 but the head"):
        apply(wrong, src, tmp_path / "o2")
    with pytest.raises(ValueError, match="equals --features"):
        apply(hp, src, src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no feature shards"):
        apply(hp, tmp_path / "empty", tmp_path / "o3")


def test_crop_rounding():
    assert _crop_for_patch(518, 14) == 518 and _crop_for_patch(518, 16) == 512 and _crop_for_patch(224, 16) == 224


def test_fit_offline_pretrained_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError):
        fit(backbone="dinov2_vitb14", weights="pretrained", synthetic=8, out=tmp_path / "r", num_workers=0)


def test_fit_synthetic_end_to_end(tmp_path):
    out = tmp_path / "run"
    rc = fit(backbone="tiny_dino", weights="random", synthetic=8, synthetic_size=64, crop_size=64, val_size=64,
             batch_size=4, epochs=1, lr=1e-2, max_stages=2, num_workers=0, accelerator="cpu", entropy=False,
             overcluster=True, out=out, seed=400)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["rasa/n_stages"] == 2 and m["rasa/stop_reason"] == "max_stages" and "meta" in m
    assert {"rasa/stage1/val/mse", "rasa/stage1/val/chance", "rasa/stage1/val/cos_pe_removed",
            "rasa/stage1/synthetic/feat-debiased/overcluster/fast100/in64/n8/k7/miou"} <= set(m)
    assert m["rasa/stage1/synthetic/feat-raw/overcluster/fast100/in64/n8/k7/miou"] == \
        m["rasa/stage2/synthetic/feat-raw/overcluster/fast100/in64/n8/k7/miou"]  # raw features do not change
    h = load_rasa_head(out / "rasa_head.safetensors")
    assert h.n_stages == 2 and json.loads(h.meta["stage_val_mse"]) == [m["rasa/stage1/val/mse"],
                                                                       m["rasa/stage2/val/mse"]]
    assert torch.equal(load_rasa_head(out / "rasa_head.pth").stage_weights, h.stage_weights)
    assert (out / "curve.png").is_file() and json.loads((out / "curve.json").read_text())["stage"] == [1, 2, 3]
    assert np.isfinite(m["rasa/final/val/mse"])


def test_fit_reads_a_voc_layout(tmp_path):
    from dinokit.data.layouts import write_voc_layout

    write_voc_layout(tmp_path / "voc", n_train=8, n_val=8, size=(64, 64), image_format="png")
    out = tmp_path / "run"
    assert fit(backbone="tiny_dino", weights="random", data=tmp_path / "voc", train_split="trainaug",
               val_split="val", crop_size=64, val_size=64, batch_size=4, epochs=1, max_stages=1, audit=False,
               num_workers=0, accelerator="cpu", entropy=False, out=out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["rasa/n_stages"] == 1 and "rasa/stage1/voc/feat-debiased/overcluster/fast100/in64/n8/k7/miou" in m
    assert m["meta"]["config"]["train_split"] == "trainaug"


def test_apply_on_dinokit_features_output(tmp_path):
    from PIL import Image

    from dinokit.commands.features import features

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    assert features(data=tmp_path / "imgs", out=tmp_path / "feats", backbone="tiny_dino", weights="random", size=64,
                    num_workers=0, shard_size=2) == 0
    raw = load_feature_dir(tmp_path / "feats")
    head = RASAHead(raw.patch.shape[-1], stage_weights=torch.randn(2, 2, raw.patch.shape[-1]))
    assert apply(head.save(tmp_path / "h.pth"), tmp_path / "feats", tmp_path / "deb") == 0
    deb = load_feature_dir(tmp_path / "deb")
    assert (deb.patch - head(raw.patch)).abs().max() <= 1e-5 and deb.image_ids == raw.image_ids


def test_convert_and_inspect(tmp_path, capsys):
    from dinokit.commands.rasa import convert, inspect, inspect_head

    head = RASAHead(D, stage_weights=torch.randn(3, 2, D))
    up = head.save(tmp_path / "h.pth")
    assert convert(up, tmp_path / "h.safetensors", format="native") == 0
    assert convert(tmp_path / "h.safetensors", tmp_path / "back.pth", format="upstream") == 0
    assert torch.equal(load_rasa_head(tmp_path / "back.pth").stage_weights, head.stage_weights)
    assert inspect(tmp_path / "h.safetensors", out=tmp_path / "info.json") == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["n_stages"] == 3 and info["norm_L_minus_LT"] > 1e-3 and len(info["principal_angles_deg"]) == 3
    orth = torch.zeros(2, 2, D)
    orth[0, 0, 0] = orth[0, 1, 1] = orth[1, 0, 2] = orth[1, 1, 3] = 1.0
    o = inspect_head(RASAHead(D, stage_weights=orth))
    assert o["norm_L_minus_LT"] < 1e-12 and o["principal_angles_deg"]["1-2"] == [90.0, 90.0]


def test_fit_resumes_from_last_finished_stage(tmp_path):
    kw = dict(backbone="tiny_dino", weights="random", synthetic=8, synthetic_size=64, crop_size=64, val_size=64,
              batch_size=4, epochs=1, lr=1e-2, num_workers=0, accelerator="cpu", entropy=False, overcluster=False,
              audit=False, out=tmp_path, seed=400)
    assert fit(max_stages=1, **kw) == 0
    first = load_rasa_head(tmp_path / "stage01.pth").stage_weights
    assert fit(max_stages=2, **kw) == 0  # continues with stage 2 only
    both = load_rasa_head(tmp_path / "rasa_head.pth").stage_weights
    assert both.shape[0] == 2 and torch.equal(both[:1], first)
