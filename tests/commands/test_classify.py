"""``dinokit classify fit`` end to end on the synthetic fine-grained scenes (tiny model, 1 epoch)."""

from __future__ import annotations

import json

import pytest

from dinokit.cli import main

TINY = ["--arch", "resnet10t", "--weights", "random", "--model_kwargs", "{channels: [8, 16, 32, 64], stem_width: 8}",
        "--n_train", "8", "--n_val", "8", "--size", "32", "--epochs", "1", "--batch_size", "4", "--num_workers", "0",
        "--accelerator", "cpu"]


def test_classify_fit_localized_with_a_pseudo_box_file(tmp_path):
    boxes = tmp_path / "boxes.json"
    assert main(["boxes", "--out", str(boxes), "--backbone", "tiny_dino", "--n_images", "8", "--n_overlays", "0"]) == 0
    out = tmp_path / "run"
    assert main(["classify", "fit", "--out", str(out), "--crop", "localized", "--boxes", str(boxes), *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "synthetic/classify/localized-file-thr1/s0/acc" in m and (out / "ema.safetensors").is_file()


def test_classify_fit_rejects_a_box_file_missing_images(tmp_path):
    boxes = tmp_path / "boxes.json"
    main(["boxes", "--out", str(boxes), "--backbone", "tiny_dino", "--n_images", "5", "--n_overlays", "0"])
    with pytest.raises(ValueError, match="lacks 3 image"):
        main(["classify", "fit", "--out", str(tmp_path / "r"), "--crop", "localized", "--boxes", str(boxes), *TINY])


def test_classify_fit_density_online(tmp_path):
    out = tmp_path / "run"
    assert main(["classify", "fit", "--out", str(out), "--crop", "density", "--density_backbone", "tiny_dino",
                 "--att_size", "64", "--canvas", "64", *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["synthetic/classify/density/s0/acc"] <= 1


@pytest.mark.parametrize("name", ["stage1", "rrc", "localized_gt", "localized_pseudo", "density"])
def test_cub_configs_parse(name, capsys):
    from pathlib import Path

    cfg = Path(__file__).parents[2] / "configs" / "classify" / f"cub_{name}.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["classify", "fit", "--config", str(cfg), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "epochs: 200" in printed and "batch_size: 32" in printed and "label_smoothing: 0.1" in printed
