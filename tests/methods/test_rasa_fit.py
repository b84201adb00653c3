"""RASA stage fitting on tokens: planted position signal -> chance within a few stages; stopping; resume."""

import json

import pytest
import torch

from dinokit.methods.rasa import RASAHead, chance_mse, fit_rasa_features, load_rasa_head, stage_curve

H = W = 8
D = 32


def _planted(n, seed, signal=True):
    """docs/methods/rasa.md: x = r a + c b + e + content + noise with a, b, e orthonormal; content off span{a, b}."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(123)))
    a, b, e = basis[:, 0], basis[:, 1], basis[:, 2]
    r = (torch.arange(H) / (H - 1)).view(1, H, 1, 1)
    c = (torch.arange(W) / (W - 1)).view(1, 1, W, 1)
    content = 0.5 * torch.randn(n, 1, 1, D, generator=g)
    content = content - (content @ a)[..., None] * a - (content @ b)[..., None] * b
    noise = 0.1 * torch.randn(n, H, W, D, generator=g)
    pos = r * a + c * b if signal else torch.zeros(1, 1, 1, D)
    return pos + e + content + noise


def _fit(signal, **kw):
    opts = dict(steps=500, batch_size=32, lr=1e-2, audit=True)
    opts.update(kw)
    return fit_rasa_features(_planted(256, 0, signal), _planted(64, 1, signal), **opts)


def test_planted_signal_reaches_chance_and_stops():
    res = _fit(True, stopping="chance", rtol=0.05, max_stages=6)
    r1, r2 = res.records[0], res.records[1]
    assert abs(r1.chance - chance_mse(H, W)) < 1e-9
    assert r1.r2 >= 0.5 and r1.committed  # stage 1 decodes position
    assert r2.r2 <= 0.05 and not r2.committed  # after one removal the fresh probe is at chance
    assert res.head.n_stages == 1 and res.stop_reason == "chance" and len(res.records) == 2
    s = res.summary()
    assert s["rasa/n_stages"] == 1 and s["rasa/stop_reason"] == "chance"
    assert s["rasa/final/val/r2"] <= 0.05


def test_no_signal_stops_after_first_stage():
    res = _fit(False, stopping="chance", min_stages=0, steps=200)
    assert len(res.records) == 1 and res.head.n_stages == 0 and res.stop_reason == "chance"
    assert res.records[0].r2 <= 0.05
    res1 = _fit(False, stopping="chance", steps=200)  # default min_stages=1 forces one commit
    assert res1.head.n_stages == 1 and len(res1.records) == 2


def test_fixed_stopping_commits_max_stages_plus_audit():
    res = _fit(True, stopping="fixed", max_stages=2, steps=100)
    assert res.head.n_stages == 2 and res.stop_reason == "max_stages"
    assert [r.committed for r in res.records] == [True, True, False]
    # each committed stage's W annihilates that stage's output
    x = _planted(4, 5)
    for t in (1, 2):
        assert (res.head(x, n_stages=t) @ res.head.stage_weights[t - 1].T).abs().max() <= 1e-5


class _Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    kw = dict(stopping="fixed", max_stages=3, steps=60)
    full = _fit(True, **kw)
    calls = []

    def killer(rec):
        calls.append(rec.stage)
        if rec.stage == 3:
            raise _Killed  # dies while stage 3 is being validated (stages 1-2 are on disk)

    with pytest.raises(_Killed):
        _fit(True, out_dir=tmp_path, on_record=killer, **kw)
    assert sorted(p.name for p in tmp_path.glob("stage*.pth")) == ["stage01.pth", "stage02.pth"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    resumed = _fit(True, out_dir=tmp_path, **kw)
    assert resumed.head.n_stages == 3
    assert torch.allclose(resumed.head.stage_weights, full.head.stage_weights, atol=1e-6)
    assert [r.stage for r in resumed.records] == [1, 2, 3, 4]
    assert torch.equal(load_rasa_head(tmp_path / "stage03.pth").stage_weights, resumed.head.stage_weights)
    again = _fit(True, out_dir=tmp_path, **kw)  # finished: nothing is retrained
    assert again.stop_reason == "max_stages" and torch.equal(again.head.stage_weights, resumed.head.stage_weights)
    more = _fit(True, out_dir=tmp_path, **{**kw, "max_stages": 4})  # a larger cap continues from stage 3
    assert more.head.n_stages == 4 and torch.equal(more.head.stage_weights[:3], resumed.head.stage_weights)


def test_stage_curve_outputs(tmp_path):
    res = _fit(True, stopping="chance", steps=100)
    stage_curve(res.records, tmp_path / "curve.png", tmp_path / "curve.json")
    data = json.loads((tmp_path / "curve.json").read_text())
    assert data["stage"] == [r.stage for r in res.records] and (tmp_path / "curve.png").stat().st_size > 1000


def test_same_seed_same_head():
    a = _fit(True, stopping="fixed", max_stages=1, steps=50, audit=False)
    b = _fit(True, stopping="fixed", max_stages=1, steps=50, audit=False)
    assert torch.equal(a.head.stage_weights, b.head.stage_weights)
    assert isinstance(a.head, RASAHead)
