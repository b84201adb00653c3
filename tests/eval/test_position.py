"""Position probe: targets, chance level, linear-in-position and position-free features (docs/eval/position.md)."""

import pytest
import torch

from dinokit.eval.position import chance_mse, position_probe, position_targets


def test_targets_and_chance_table():
    t = position_targets(2, 3).reshape(-1, 2).tolist()
    assert t == [[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1]]
    for (h, w), v in {(14, 14): 0.0961538, (16, 16): 0.0944444, (8, 8): 0.1071429, (16, 32): 0.0915771}.items():
        assert chance_mse(h, w) == pytest.approx(v, abs=1e-7)
        assert float(((position_targets(h, w) - 0.5) ** 2).mean()) == pytest.approx(v, abs=1e-7)
    with pytest.raises(ValueError):
        position_targets(1, 4)


def _linear_position_feats(n, h=8, w=8, d=16, seed=0):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y = position_targets(h, w)
    noise = torch.randn(n, h, w, d, generator=torch.Generator().manual_seed(seed))
    return (y[..., :1] * a + y[..., 1:] * b).expand(n, h, w, d) + 0.001 * noise


def test_linear_in_position_gives_mse_near_zero():
    tr, va = _linear_position_feats(32), _linear_position_feats(8, seed=1)
    r = position_probe(tr, va, probe="ridge")
    assert r.metrics["mse"] < 1e-4 and r.metrics["r2"] >= 0.99
    onehot = torch.eye(64).view(8, 8, 64).expand(16, 8, 8, 64)
    assert position_probe(onehot, onehot[:4], probe="ridge").metrics["r2"] >= 0.99
    # sigmoid probe on logit-scaled position features (the sigmoid's range is (0, 1))
    y = position_targets(8, 8).clamp(0.02, 0.98)
    logit = torch.log(y / (1 - y))
    f = torch.cat([logit, torch.zeros(8, 8, 6)], -1).expand(32, 8, 8, 8)
    s = position_probe(f, f[:4], lr=0.05, epochs=60, batch_size=8)
    assert s.metrics["mse"] < 0.02 * s.metrics["chance"]
    assert s.curve[-1] < s.curve[0]


def test_position_free_features_give_chance():
    g = torch.Generator().manual_seed(0)
    tr, va = torch.randn(256, 8, 8, 16, generator=g), torch.randn(64, 8, 8, 16, generator=g)
    r = position_probe(tr, va, probe="ridge")
    assert abs(r.metrics["r2"]) <= 0.02
    s = position_probe(tr, va)
    assert s.metrics["chance"] == pytest.approx(chance_mse(8, 8))
    assert s.metrics["mse"] == pytest.approx(s.metrics["chance"], rel=0.5)
    assert s.metrics["r2"] < 0.05


def test_grid_mismatch_raises():
    with pytest.raises(ValueError, match="differ in grid"):
        position_probe(torch.zeros(2, 4, 4, 8), torch.zeros(2, 5, 5, 8))
