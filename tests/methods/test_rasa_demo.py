"""The RASA demo stage runs in quick mode and reports before/after numbers next to chance."""

import math

from dinokit.demo import run_demo as demo


def test_rasa_demo_quick(tmp_path):
    import json

    assert demo(out=tmp_path, stages=["rasa"], n_images=16, quick=True) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["rasa/n_stages"] >= 1 and m["rasa/weights"] == "random"
    assert abs(m["rasa/chance"] - 0.1071429) < 1e-6  # 8x8 grid
    for k in ("position/sigmoid/r2", "linear/miou", "overcluster/k7/miou"):
        assert math.isfinite(m[f"rasa/before/{k}"]) and math.isfinite(m[f"rasa/after/{k}"])
    assert (tmp_path / "figures" / "rasa_stage_curve.png").is_file()
    assert "RANDOM" in (tmp_path / "report.html").read_text()
