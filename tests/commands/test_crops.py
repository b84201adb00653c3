"""``dinokit boxes``, ``dinokit crops maiou-curve`` and ``dinokit crops density-cache`` end to end (tiny)."""

from __future__ import annotations

import json

import pytest

from dinokit.cli import main


def test_boxes_command_writes_json_meta_overlays_and_metrics(tmp_path):
    out = tmp_path / "b" / "boxes.json"
    assert main(["boxes", "--out", str(out), "--backbone", "tiny_dino", "--n_images", "6", "--image_size", "64",
                 "--n_overlays", "2"]) == 0
    boxes = json.loads(out.read_text())
    assert len(boxes) == 6 and all(len(v) == 4 and all(isinstance(x, int) for x in v) for v in boxes.values())
    meta = json.loads((tmp_path / "b" / "boxes.meta.json").read_text())
    assert meta["count"] == 6 and meta["rule"] == "fixed" and "degenerate_ids" in meta
    metrics = json.loads((tmp_path / "b" / "boxes.metrics.json").read_text())
    keys = [k for k in metrics if k != "meta"]
    assert any(k.endswith("/corloc") for k in keys) and any(k.endswith("/miou_box") for k in keys)
    assert all(k.startswith("synthetic/boxes/native/tiny_dino-b1-fixed-centroid/") for k in keys)
    assert (tmp_path / "b" / "boxes.overlays.png").stat().st_size > 0
    # same seed -> same boxes
    out2 = tmp_path / "c" / "boxes.json"
    main(["boxes", "--out", str(out2), "--backbone", "tiny_dino", "--n_images", "6", "--n_overlays", "0"])
    assert json.loads(out2.read_text()) == boxes


def test_maiou_curve_command(tmp_path, capsys):
    assert main(["crops", "maiou-curve", "--n_images", "300", "--thr", "0,1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "maiou_curve.json").read_text())
    assert res["maiou/synthetic/thr1"] > 0.99 and 0.4 < res["maiou/synthetic/thr0"] < 0.6
    assert 0.5 < res["maiou/synthetic/rrc"] < 0.7  # plain RandomResizedCrop: ~0.60 on this set
    assert (tmp_path / "maiou_curve.png").is_file()
    main(["crops", "maiou-curve", "--maiou", "0.75"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["thr"] == pytest.approx(0.5 ** 2.5)
    with pytest.raises(ValueError, match="needs data"):
        main(["crops", "maiou-curve", "--boxes", "gt"])


def test_density_cache_command(tmp_path):
    from dinokit.data.crops import DensityCache

    out = tmp_path / "d.safetensors"
    assert main(["crops", "density-cache", "--out", str(out), "--backbone", "tiny_dino", "--n_images", "4"]) == 0
    cache = DensityCache(out, expected={"backbone": "tiny_dino"})
    assert len(cache.maps) == 4
