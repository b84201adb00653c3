"""RASA core: removal identities, sequential semantics, folding, targets/chance, checkpoints, transform."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinokit.backbones import DenseFeatures, load_backbone
from dinokit.methods.rasa import (
    FoldedRASA,
    RASACheckpointError,
    RASAHead,
    RASATransform,
    attach_rasa,
    chance_mse,
    head_from_state_dict,
    load_rasa_head,
    probe_mse,
    rasa_basis,
    remove,
)
from dinokit.methods.rasa import flat_position_targets as position_targets

D = 64


def _x(dtype=torch.float32, B=2, N=50, d=D):
    return torch.randn(B, N, d, dtype=dtype)


def _W(T=None, d=D, dtype=torch.float32):
    shape = (2, d) if T is None else (T, 2, d)
    return torch.randn(*shape, dtype=dtype) / math.sqrt(d)


# ---------------------------------------------------------------- §13.1 decomposition
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_single_stage_decomposition(dtype, tol):
    x, W = _x(dtype), _W(dtype=dtype)
    pos, nopos = remove(x, W)
    assert (pos + nopos - x).abs().max() <= (1e-6 if dtype == torch.float32 else tol)
    assert (nopos @ W.T).abs().max() <= tol
    assert (pos @ W.T - x @ W.T).abs().max() <= tol
    per_tok = (pos * nopos).sum(-1).abs()
    assert (per_tok <= (1e-4 if dtype == torch.float32 else 1e-12) * x.pow(2).sum(-1)).all()
    _, twice = remove(nopos, W)
    assert (twice - nopos).abs().max() <= tol


# ---------------------------------------------------------------- §13.2 invariance (issue: rescaling / sign flips)
@settings(max_examples=10, deadline=None)
@given(a=st.sampled_from([-3.0, 0.5, 7.0]), b=st.sampled_from([-3.0, 0.5, 7.0]), swap=st.booleans())
def test_rescale_sign_flip_swap_change_nothing(a, b, swap):
    torch.manual_seed(1)
    x, W = _x(), _W()
    ref = remove(x, W)[1]
    W2 = torch.diag(torch.tensor([a, b])) @ W
    if swap:
        W2 = W2.flip(0)
    assert (remove(x, W2)[1] - ref).abs().max() <= 1e-5
    head = RASAHead(D, stage_weights=torch.stack([W, _W()]))
    head2 = RASAHead(D, stage_weights=torch.stack([W2, head.stage_weights[1]]))
    assert (head(x) - head2(x)).abs().max() <= 1e-5


# ---------------------------------------------------------------- §13.3 degenerate rows (issue: collinear -> no NaN)
def test_collinear_rows_give_rank1_without_nan():
    x, W = _x(), _W()
    col = torch.stack([W[0], 3 * W[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = RASAHead(D, stage_weights=col[None])
        with pytest.warns(RuntimeWarning, match="collinear"):
            RASAHead(D, stage_weights=col[None])(x)
        out = head(x)
    assert torch.isfinite(out).all()
    a = W[0] / W[0].norm()
    rank1 = x - (x @ a)[..., None] * a
    assert (out - rank1).abs().max() <= 1e-5
    assert rasa_basis(col).shape == (D, 1)
    assert torch.isfinite(head.fold()(x)).all() and (head.fold()(x) - rank1).abs().max() <= 1e-5


def test_zero_rows():
    x, W = _x(), _W()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(remove(x, torch.zeros(2, D))[1], x)
        one_zero = torch.stack([torch.zeros(D), W[1]])
        b = W[1] / W[1].norm()
        assert (remove(x, one_zero)[1] - (x - (x @ b)[..., None] * b)).abs().max() <= 1e-5


# ---------------------------------------------------------------- §13.4 sequential semantics (issue must-shows)
def test_every_stage_w_annihilates_its_output_and_sequential_is_order_dependent():
    x = _x()
    head = RASAHead(D, stage_weights=_W(3))
    for t in range(1, 4):  # W_t x^(t) = 0 for every stage's W, on that stage's debiased output
        assert (head(x, n_stages=t) @ head.stage_weights[t - 1].T).abs().max() <= 1e-5
    out = head(x)
    assert (out @ head.stage_weights[2].T).abs().max() <= 1e-5
    assert (out @ head.stage_weights[0].T).abs().max() > 1e-2  # earlier directions re-introduced: not a projector
    joint = RASAHead(D, stage_weights=head.stage_weights, removal="joint")
    xj = joint(x)
    assert (xj - out).abs().max() > 1e-2  # sequential != one joint projection (directions not orthogonal)
    for t in range(3):
        assert (xj @ head.stage_weights[t].T).abs().max() <= 1e-5
    rev = RASAHead(D, stage_weights=head.stage_weights.flip(0))
    assert (rev(x) - out).abs().max() > 1e-2  # stored order matters


def test_orthogonal_stages_make_sequential_equal_joint():
    # rows with disjoint supports: exactly orthogonal stage subspaces even in fp32 storage
    sw = torch.zeros(3, 2, D, dtype=torch.float64)
    for r, block in enumerate(torch.randperm(D)[:60].reshape(6, -1)):
        sw[r // 2, r % 2, block] = torch.randn(len(block), dtype=torch.float64)
    head = RASAHead(D, stage_weights=sw.float())
    x = _x(torch.float64)
    joint = RASAHead(D, stage_weights=sw.float(), removal="joint")
    assert (head(x) - joint(x)).abs().max() <= 1e-6
    L = head.fold().L64
    assert (L - L.T).abs().max() <= 1e-10 and (L @ L - L).abs().max() <= 1e-10
    assert (L - joint.fold().L64).abs().max() <= 1e-6


# ---------------------------------------------------------------- §13.5 upstream parity
def _upstream(x, weights, use_pos_pred=True):
    """Direct transcription of the upstream algorithm: per stage normalise rows, Gram-Schmidt row-first,
    subtract the projection; returns (residual, last stage's position part)."""
    stages = weights if use_pos_pred else weights[:-1]
    pos = None
    for W in stages:
        a = W[0] / W[0].norm()
        b = W[1] / W[1].norm()
        b = b - (b @ a) * a
        b = b / b.norm()
        pos = (x @ a)[..., None] * a + (x @ b)[..., None] * b
        x = x - pos
    return x, pos


def test_upstream_parity_fp64():
    sw = _W(4, dtype=torch.float64)
    x = _x(torch.float64)
    head = RASAHead(D, stage_weights=sw.float())
    sw32 = head.stage_weights.double()
    ref, ref_pos = _upstream(x, sw32)
    out, total, last = head(x, return_components=True)
    assert (out - ref).abs().max() <= 1e-12
    assert (last - ref_pos).abs().max() <= 1e-12
    assert (total - (x - out)).abs().max() <= 1e-12
    ref3, _ = _upstream(x, sw32, use_pos_pred=False)
    assert (head(x, n_stages=3) - ref3).abs().max() <= 1e-12
    o, removed = head(x, return_removed=True)
    assert torch.equal(o, out) and (removed - total).abs().max() == 0
    z, zt, zl = head(x, n_stages=0, return_components=True)
    assert torch.equal(z, x) and zt.abs().max() == 0 and zl.abs().max() == 0


# ---------------------------------------------------------------- §13.6 folding (issue: folded == sequential)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fold_equals_sequential(dtype, tol):
    d = 384
    head = RASAHead(d, stage_weights=_W(10, d=d))
    x = torch.randn(2, 50, d, dtype=dtype)
    ref = head(x)
    for mode in ("dense", "lowrank", "auto"):
        assert (head.fold(mode)(x) - ref).abs().max() <= tol
    L = head.fold().L64
    assert (L - L.T).norm() > 1e-3 and (L @ L - L).norm() > 1e-3
    f = head.fold()
    assert f.resolved_mode == "lowrank" and head.fold("dense").resolved_mode == "dense"
    Q, G = f.Q64, f.G64
    assert (torch.eye(d, dtype=torch.float64) - Q @ G @ Q.T - L).abs().max() <= 1e-12
    assert torch.allclose(G.tril(-1), torch.zeros_like(G)) and torch.allclose(G.diag(), torch.ones(20).double())


def test_folded_save_load(tmp_path):
    head = RASAHead(D, stage_weights=_W(3))
    p = head.fold().save(tmp_path / "folded.safetensors")
    f = FoldedRASA.load(p)
    x = _x()
    assert (f(x) - head(x)).abs().max() <= 1e-5 and f.n_stages == 3


# ---------------------------------------------------------------- §13.7 targets and chance
def test_targets_and_chance_table():
    y = position_targets(2, 3)
    assert torch.allclose(y, torch.tensor([[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1.]]))
    table = {(14, 14): 0.0961538, (16, 16): 0.0944444, (32, 32): 0.0887097, (37, 37): 0.0879630,
             (8, 8): 0.1071429, (16, 32): 0.0915771}
    for (h, w), v in table.items():
        assert abs(chance_mse(h, w) - v) <= 1e-7
        assert abs(float((position_targets(h, w, dtype=torch.float64) - 0.5).pow(2).mean()) - v) <= 1e-7
        x = torch.randn(3, h, w, 8)
        assert abs(float(probe_mse(x, torch.zeros(2, 8))) - chance_mse(h, w)) <= 1e-6  # zero probe = chance
    for h, w in ((1, 5), (5, 1)):
        with pytest.raises(ValueError, match="2x2"):
            position_targets(h, w)
        with pytest.raises(ValueError):
            chance_mse(h, w)


# ---------------------------------------------------------------- §13.10 checkpoints (issue: upstream round trip)
def test_upstream_and_native_round_trips(tmp_path):
    head = RASAHead(D, stage_weights=_W(4))
    sd = head.upstream_state_dict()
    assert set(sd) == {"pre_pos_layers.0.weight", "pre_pos_layers.1.weight", "pre_pos_layers.2.weight",
                       "pos_pred.weight"}
    assert all(v.dtype == torch.float32 and v.shape == (2, D) for v in sd.values())
    assert torch.equal(head_from_state_dict(sd).stage_weights, head.stage_weights)
    for fmt in ("upstream", "native"):
        p = head.save(tmp_path / f"h.{fmt}", format=fmt, metadata={"backbone": "x", "stage_val_mse": [0.1, 0.09]})
        back = load_rasa_head(p)
        assert torch.equal(back.stage_weights, head.stage_weights) and back.n_stages == 4
    assert load_rasa_head(tmp_path / "h.native").meta["backbone"] == "x"
    with pytest.raises(RASACheckpointError, match="0 stages"):
        RASAHead(D).save(tmp_path / "empty.pth")


def test_prefixed_and_lightning_state_dicts(tmp_path):
    head = RASAHead(D, stage_weights=_W(3))
    sd = head.upstream_state_dict()
    pref = {f"module.rasa_head.{k}": v for k, v in sd.items()}
    assert torch.equal(head_from_state_dict(pref).stage_weights, head.stage_weights)
    ckpt = {"state_dict": {**{f"head.{k}": v for k, v in sd.items()}, "backbone.blocks.0.w": torch.zeros(3)},
            "epoch": 4}
    torch.save(ckpt, tmp_path / "lightning.ckpt")
    assert torch.equal(load_rasa_head(tmp_path / "lightning.ckpt").stage_weights, head.stage_weights)


def test_bad_checkpoints_raise(tmp_path):
    sd = RASAHead(D, stage_weights=_W(4)).upstream_state_dict()
    gap = {k: v for k, v in sd.items() if k != "pre_pos_layers.1.weight"}
    with pytest.raises(RASACheckpointError, match=r"not contiguous.*missing \[1\]"):
        head_from_state_dict(gap)
    with pytest.raises(RASACheckpointError, match="pos_pred.weight"):
        head_from_state_dict({k: v for k, v in sd.items() if k != "pos_pred.weight"})
    mixed = dict(sd, **{"pre_pos_layers.0.weight": torch.randn(2, D + 1)})
    with pytest.raises(RASACheckpointError, match="different dimensions"):
        head_from_state_dict(mixed)
    with pytest.raises(RASACheckpointError, match="embed_dim is 32"):
        head_from_state_dict(sd, embed_dim=32)
    with pytest.raises(RASACheckpointError, match=r"\(2, D\)"):
        head_from_state_dict(dict(sd, **{"pos_pred.weight": torch.randn(3, D)}))
    torch.save(gap, tmp_path / "gap.pth")
    with pytest.raises(RASACheckpointError, match="gap.pth"):
        load_rasa_head(tmp_path / "gap.pth")
    with pytest.raises(FileNotFoundError, match="rasa fit"):
        load_rasa_head(tmp_path / "nope.pth")


# ---------------------------------------------------------------- §13.11 transform and backbone integration
def test_transform_shapes_dtypes_and_prefix_tokens():
    head = RASAHead(D, stage_weights=_W(3))
    tr = RASATransform(head)
    patch = torch.randn(2, 4, 5, D)
    f = DenseFeatures(patch, torch.randn(2, D), torch.randn(2, 4, D), (4, 5), 14, 11)
    out = tr(f)
    assert out.cls is f.cls and out.registers is f.registers and out.grid == (4, 5)
    assert torch.equal(out.patch.reshape(2, 20, D), tr(patch.reshape(2, 20, D)))
    assert (out.patch - head(patch)).abs().max() <= 1e-5
    bf = tr(patch.bfloat16())
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - tr(patch.bfloat16().float())).abs().max() <= 0.02 * patch.abs().max()
    with pytest.raises(ValueError, match="D = 64 but these features have D = 32"):
        tr(DenseFeatures(torch.randn(1, 2, 2, 32), None, torch.zeros(1, 0, 32), (2, 2), 14, 0))
    with pytest.raises(ValueError, match="embed_dim 64 but the tokens have D = 32"):
        head(torch.randn(3, 32))


def test_load_backbone_with_rasa_path(tmp_path):
    bb = load_backbone("tiny_dinov2_reg", weights="random").eval()
    head = RASAHead(bb.embed_dim, stage_weights=_W(2, d=bb.embed_dim))
    path = head.save(tmp_path / "head.pth")
    deb = load_backbone("tiny_dinov2_reg", weights="random", rasa=str(path)).eval()
    deb.load_state_dict(bb.state_dict())
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        raw, out = bb.forward_features(x), deb.forward_features(x)
    assert (out.patch - head(raw.patch)).abs().max() <= 1e-5
    assert torch.allclose(out.cls, raw.cls) and torch.allclose(out.registers, raw.registers)
    assert deb.state_dict().keys() == bb.state_dict().keys()  # the transform adds no state
    wrong = RASAHead(48, stage_weights=_W(2, d=48)).save(tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="embed_dim is 32"):
        attach_rasa(bb, wrong)
    with pytest.raises(ValueError, match="embed_dim 32"):
        attach_rasa(bb, RASAHead(48, stage_weights=_W(2, d=48)))
