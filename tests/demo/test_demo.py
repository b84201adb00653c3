"""`dinokit demo` end to end (quick settings): every stage writes its metrics, figures and report section."""

import json

from dinokit.cli import main
from dinokit.demo import STAGES


def test_demo_all_stages_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--n_images", "16", "--seed", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    assert metrics["foundation/images"] == 16 and metrics["foundation/weights"] == "random"
    assert metrics["meta"]["config"]["seed"] == 0 and "torch" in metrics["meta"]["versions"]
    ran = set(metrics["meta"]["stage_seconds"])
    assert "foundation" in ran and ran <= set(STAGES)
    for stage in ran:
        assert any(k.startswith(f"{stage}/") for k in metrics), stage
    assert (out / "figures" / "foundation_attention_pca.png").stat().st_size > 1000
    assert "RANDOM weights" in html
    assert list((out / "features").glob("shard-*.safetensors"))
    if "barlow" in ran:  # the pretraining really updates the backbone, even after stages that froze theirs
        assert metrics["barlow/backbone_max_param_change"] > 0


def test_demo_rejects_unknown_stage(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown demo stage"):
        main(["demo", "--out", str(tmp_path), "--stages", "[nope]"])
