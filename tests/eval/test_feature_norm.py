import torch

from dinokit.cli import main
from dinokit.eval.feature_norm import feature_norm


def test_unit_norm_features_have_mean_one_and_no_spread():
    f = torch.nn.functional.normalize(torch.randn(2, 3, 4, 8), dim=-1)
    r = feature_norm(f)
    assert abs(r["mean"] - 1) < 1e-6 and r["std"] < 1e-6 and abs(r["min"] - 1) < 1e-6


def test_known_norms():
    f = torch.zeros(1, 1, 2, 2)
    f[0, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    r = feature_norm(f)  # norms {5, 0}
    assert (r["mean"], r["std"], r["min"], r["max"]) == (2.5, 2.5, 0.0, 5.0)


def test_command_writes_json(tmp_path):
    import json

    assert main(["synth", "--out", str(tmp_path / "s"), "--n_train", "2", "--n_val", "2", "--size", "32",
                 "--layouts", "voc"]) == 0
    assert main(["eval", "feature-norm", "--data", str(tmp_path / "s" / "voc"), "--backbone", "tiny_dino",
                 "--weights", "random", "--size", "32", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "feature-norm.json").read_text())
    assert any(k.endswith("/feature_norm/in32/mean") and v > 0 for k, v in res.items() if not k.startswith("meta"))
