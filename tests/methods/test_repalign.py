"""RepAlignLoss: closed forms, reference formulas, gradients, hooks, isolation, eval mode, errors, precision."""

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dinokit.backbones import load_backbone
from dinokit.methods.repalign import (
    RepAlignLoss,
    _GroupTerm,
    _target_hook,
    depth_weights,
    group_view,
    repalign_terms,
)


# ------------------------------------------------------------------------------------------------ helpers
class Taps(nn.Module):
    """A teacher whose hooked activations are chosen tensors: tap i sees f_i(input)."""

    def __init__(self, *fns):
        super().__init__()
        self.fns = fns
        self.taps = nn.ModuleList(nn.Identity() for _ in fns)

    def forward(self, x):
        for f, t in zip(self.fns, self.taps):
            t(f(x))
        return x


def tap_loss(*fns, **kw):
    return RepAlignLoss(Taps(*fns), layer_types=(nn.Identity,), **kw)


def closed_form(xs, ys, g):
    """mean over all groups of all terms of (1 - cos), computed with cosine_similarity (independent path)."""
    cos = []
    for x, y in zip(xs, ys):
        fx = x.reshape(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x[:, None]
        fy = y.reshape(fx.shape)
        pad = (-fx.shape[-1]) % g
        gx = F.pad(fx, (0, pad)).reshape(-1, g)
        gy = F.pad(fy, (0, pad)).reshape(-1, g)
        cos.append(F.cosine_similarity(gx.double(), gy.double(), dim=-1, eps=0))
    return (1 - torch.cat(cos)).mean()


def all_hooks_empty(m: nn.Module) -> bool:
    return all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def naive_loss(teacher, output, target, **kw):
    """Two-list reference: raw activations with grad, then repalign_terms."""
    acts = []
    layers = [m for m in teacher.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hs = [m.register_forward_hook(lambda m, a, o: acts.append(o)) for m in layers]
    try:
        with torch.no_grad():
            teacher(target)
        ys = list(acts)
        acts.clear()
        teacher(output)
        xs = list(acts)
    finally:
        for h in hs:
            h.remove()
    return repalign_terms(xs, ys, **kw)[0]


@pytest.fixture(scope="module")
def vit():
    return load_backbone("tiny_dinov2", "random").model


# ------------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 3, 5, 3), (2, 7, 5), (3, 10), (3, 9)])
@pytest.mark.parametrize("g", [2, 3, 4])
def test_group_mode_equals_mean_one_minus_cos(shape, g):
    x, y = torch.randn(shape), torch.randn(shape)
    loss = tap_loss(lambda t: t, group_size=g)(x, y)
    assert abs(loss.item() - closed_form([x], [y], g).item()) < 1e-6


def test_closed_form_over_several_terms_global_and_per_layer():
    fns = (lambda t: t, lambda t: t.flatten(2).transpose(1, 2)[:, :, :5], lambda t: t.mean((2, 3)))
    x, y = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    loss = tap_loss(*fns)
    xs, ys = [f(x) for f in fns], [f(y) for f in fns]
    assert abs(loss(x, y).item() - closed_form(xs, ys, 2).item()) < 1e-6
    per = tap_loss(*fns, layer_reduction="per_layer")(x, y)
    expect = torch.stack([closed_form([a], [b], 2) for a, b in zip(xs, ys)]).mean()
    assert abs(per.item() - expect.item()) < 1e-6


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6), g=st.integers(2, 4))
def test_closed_form_property(b, c, h, w, g):
    x, y = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, c, h, w, dtype=torch.float64)
    loss = tap_loss(lambda t: t, group_size=g)(x, y)
    assert 0 <= loss.item() <= 2
    assert abs(loss.item() - closed_form([x], [y], g).item()) < 1e-6


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 3, 5, 3), (2, 7, 5)])
@pytest.mark.parametrize("g", [2, 3, 4])
def test_reference_element_mse_constant(shape, g):
    """Upstream: element MSE of unit groups, padding counted = (2/g) mean(1 - cos); equal at g = 2 (to 1e-7)."""
    x, y = torch.randn(shape), torch.randn(shape)
    xh = F.normalize(group_view(x, g), dim=-1, eps=1e-12)
    yh = F.normalize(group_view(y, g), dim=-1, eps=1e-12)
    upstream = F.mse_loss(xh, yh)  # element mean including padding
    loss = tap_loss(lambda t: t, group_size=g)(x, y)
    assert abs(loss.item() - (g / 2) * upstream.item()) < 1e-7 * max(1, g)
    if g == 2:
        assert abs(loss.item() - upstream.item()) < 1e-7


def test_zero_groups_contribute_half_or_nothing():
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 3.0, 4.0]]])
    y = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]])
    # groups: ([1,0],[0,1]) -> 1-cos = 1 ; ([0,0],[0,0]) -> 0 ; ([3,4],[0,0]) -> 1/2
    loss = tap_loss(lambda t: t)(x, y)
    assert abs(loss.item() - (1 + 0 + 0.5) / 3) < 1e-7


def test_two_d_rule_groups_features_not_sign_matching():
    """(B, D) is grouped along D: same signs but different directions still cost (upstream: 0)."""
    x, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 1.0, 3.0]])
    loss = tap_loss(lambda t: t)(x, y)
    cos = F.cosine_similarity(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]), dim=0)
    assert abs(loss.item() - ((1 - cos) + 0) / 2) < 1e-6 and loss.item() > 0.05


def test_whole_mode_formula_and_cosine_closed_form():
    fns = (lambda t: t, lambda t: t.flatten(2).transpose(1, 2))
    x, y = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    w = depth_weights(2, "linear")
    got = tap_loss(*fns, mode="whole", depth_weighting="linear")(x, y)
    expect, approx = 0.0, 0.0
    for wl, f in zip(w.tolist(), fns):
        a, b = f(x).reshape(3, -1), f(y).reshape(3, -1)
        sa, sb = a.norm(dim=1, keepdim=True) + 1e-8, b.norm(dim=1, keepdim=True) + 1e-8
        expect += wl * ((a / sa - b / sb) ** 2).mean(1).sum()
        approx += wl * ((2 - 2 * F.cosine_similarity(a, b, dim=1)) / a.shape[1]).sum()
    assert torch.equal(got, (expect / (2 * 3)).float()) or abs(got.item() - expect.item() / 6) < 1e-9
    assert abs(got.item() - approx.item() / 6) < 1e-6


def test_streamed_equals_two_list_reference_on_vit(vit):
    x, y = torch.randn(2, 3, 56, 56, requires_grad=True), torch.randn(2, 3, 56, 56)
    for kw in [{}, dict(group_size=3), dict(depth_weighting="exp"), dict(layer_reduction="per_layer"),
               dict(mode="whole"), dict(mode="whole", detach_norm=False, depth_weighting="linear")]:
        x.grad = None
        loss, terms = RepAlignLoss(vit, **kw)(x, y, return_terms=True)
        loss.backward()
        gx = x.grad.clone()
        x.grad = None
        ref = naive_loss(vit, x, y, **kw)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-6, kw
        assert terms.shape == (9,) and (terms >= 0).all()
        assert torch.allclose(gx, x.grad, rtol=1e-4, atol=1e-9), kw


# ------------------------------------------------------------------------------------------------ bounds, weights
def test_zero_when_output_equals_target(vit):
    x = torch.randn(2, 3, 56, 56)
    assert RepAlignLoss(vit)(x, x.clone()).item() == 0.0
    assert RepAlignLoss(vit, mode="whole")(x, x.clone()).item() < 1e-12


def test_depth_weights_mean_one_and_upstream_scales():
    for spec in ["exp", "linear", [1.0, 2.0, 0.5, 4.0]]:
        w = depth_weights(4, spec)
        assert abs(w.mean().item() - 1) < 1e-12
    fns = (lambda t: t, lambda t: t[:, :2], lambda t: t.flatten(1))
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    xs, ys, n = [f(x) for f in fns], [f(y) for f in fns], 3
    # first upstream version: exp weights summing to 1, global element mean -> dinokit / n
    e = torch.exp(0.1 * torch.arange(n, dtype=torch.float64))
    e = e / e.sum()
    num = sum(e[i] * ((F.normalize(group_view(a, 2), dim=-1) - F.normalize(group_view(b, 2), dim=-1)) ** 2).sum()
              for i, (a, b) in enumerate(zip(xs, ys)))
    upstream_first = num / sum(group_view(a, 2).numel() for a in xs)
    ours = tap_loss(*fns, depth_weighting="exp")(x, y)
    assert abs(ours.item() / n - upstream_first.item()) < 1e-6
    # current upstream version: weights (l+1)/(n+1) (mean 1/2) -> dinokit "linear" / 2
    lin = [(i + 1) / (n + 1) for i in range(n)]
    upstream_now = sum(lin[i] * ((a.reshape(2, -1) / (a.reshape(2, -1).norm(dim=1, keepdim=True) + 1e-8)
                                  - b.reshape(2, -1) / (b.reshape(2, -1).norm(dim=1, keepdim=True) + 1e-8)) ** 2)
                       .mean(1).sum() for i, (a, b) in enumerate(zip(xs, ys))) / (n * 2)
    ours_now = tap_loss(*fns, mode="whole", depth_weighting="linear")(x, y)
    assert abs(ours_now.item() / 2 - upstream_now.item()) < 1e-7


# ------------------------------------------------------------------------------------------------ gradients
def test_gradcheck_group_term_float64_with_tiny_groups():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    x[0, 0, :2] = torch.tensor([1e-3, -2e-3], dtype=torch.float64)  # |v| < eps = 0.05: linear branch
    x.requires_grad_(True)
    y_hat = F.normalize(group_view(torch.randn(2, 3, 5, dtype=torch.float64), 2), dim=-1)
    assert torch.autograd.gradcheck(lambda t: _GroupTerm.apply(t, y_hat, 2, 0.05, False), (x,), eps=1e-6)
    assert torch.autograd.gradcheck(lambda t: _GroupTerm.apply(t, y_hat[..., :1, :], 2, 1e-12, False),
                                    (x[:, :, :2].detach().clone().requires_grad_(True),))


def test_gradient_reaches_output_never_teacher(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    x = torch.randn(2, 3, 56, 56, requires_grad=True)
    loss = RepAlignLoss(vit)
    opt = torch.optim.SGD([x], lr=10.0)
    for _ in range(2):
        opt.zero_grad()
        loss(x, torch.randn(2, 3, 56, 56)).backward()
        opt.step()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vit.parameters())
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert list(loss.parameters()) == [] and len(loss.state_dict()) == 0


def test_gradient_is_tangent_to_groups():
    """d/dv of 1/2|v^ - y^|^2 is orthogonal to v: scaling a group does not change the loss to first order."""
    x = torch.randn(2, 4, 6, requires_grad=True)
    tap_loss(lambda t: t)(x, torch.randn(2, 4, 6)).backward()
    radial = (group_view(x.grad, 2) * group_view(x.detach(), 2)).sum(-1)
    assert radial.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ hooks, isolation
class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.armed = False

    def forward(self, x):
        x = self.fc(x)
        if self.armed:
            raise RuntimeError("boom")
        return x


def test_no_hooks_after_call_exception_close_and_gc(vit):
    loss = RepAlignLoss(vit)
    loss(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56))
    assert all_hooks_empty(vit)
    loss.capture(torch.randn(1, 3, 56, 56))
    assert all_hooks_empty(vit)
    boom = Boom()
    bl = RepAlignLoss(boom)
    boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        bl(torch.randn(2, 4), torch.randn(2, 4))
    assert all_hooks_empty(boom)
    boom.armed = False
    assert bl(torch.randn(2, 4), torch.randn(2, 4)).item() >= 0  # teacher usable again (no stale busy flag)
    with RepAlignLoss(vit) as cm:
        cm(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56))
    assert all_hooks_empty(vit)
    with pytest.raises(RuntimeError, match="closed"):
        cm(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56))
    # a hook left by an interrupted call is removed by close() and by garbage collection (weakref.finalize)
    for finish in ("close", "gc"):
        lo = RepAlignLoss(vit)
        lo._register(_target_hook(lo._state()))
        assert not all_hooks_empty(vit)
        if finish == "close":
            lo.close()
        else:
            del lo
            gc.collect()
        assert all_hooks_empty(vit)


def test_two_instances_and_foreign_forwards_do_not_interfere(vit):
    x, y = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    a, b = RepAlignLoss(vit), RepAlignLoss(vit, mode="whole")
    alone_a, alone_b = a(x, y).item(), b(x, y).item()
    vit(torch.randn(2, 3, 56, 56))  # an unrelated teacher forward
    assert a(x, y).item() == alone_a and b(x, y).item() == alone_b
    c1, c2 = a.capture(x), a.capture(x)
    assert len(c1) == len(c2) == 9 and c1 is not c2 and all(torch.equal(u, v) for u, v in zip(c1, c2))


def test_nested_call_raises():
    class Nest(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.inner = None

        def forward(self, x):
            if self.inner is not None:
                self.inner.capture(x)
            return self.fc(x)

    t = Nest()
    loss = RepAlignLoss(t)
    t.inner = RepAlignLoss(t).eval()
    with pytest.raises(RuntimeError, match="nested"):
        loss(torch.randn(2, 3), torch.randn(2, 3))
    assert all_hooks_empty(t)


def test_teacher_stays_in_eval_and_dropout_is_deterministic():
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 8))

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(8, 8)
            self.loss = RepAlignLoss(teacher)

    s = Student()
    s.train()
    assert s.training and s.loss.training and not any(m.training for m in teacher.modules())
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    v1, v2 = s.loss(x, y).item(), s.loss(x, y).item()
    assert v1 == v2
    teacher.train()  # directly: fixed at the next call with one warning
    with pytest.warns(UserWarning, match="train mode"):
        v3 = s.loss(x, y).item()
    assert v3 == v1 and not teacher.training
    assert "loss._teacher" not in dict(s.named_modules()) and len(s.state_dict()) == 2


def test_moves_with_to_and_half():
    teacher = nn.Sequential(nn.Linear(4, 4))
    loss = RepAlignLoss(teacher).double()
    assert teacher[0].weight.dtype == torch.float64 and not teacher[0].weight.requires_grad
    x = torch.randn(2, 4, dtype=torch.float64)
    assert loss(x, x + 1).dtype == torch.float32


def test_early_exit_skips_tail_and_keeps_value():
    calls = []

    class Tail(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), Tail())
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    v = RepAlignLoss(teacher)(x, y).item()
    assert len(calls) == 1  # target pass only
    assert RepAlignLoss(teacher, early_exit=False)(x, y).item() == v and len(calls) == 3


def test_any_teacher_resnet_eva_and_block_names():
    import timm

    res = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    x, y = torch.randn(2, 3, 32, 32, requires_grad=True), torch.randn(2, 3, 32, 32)
    loss = RepAlignLoss(res)
    assert abs(loss(x, y).item() - naive_loss(res, x, y).item()) < 1e-6
    eva = load_backbone("tiny_dinov3", "random").model
    v = RepAlignLoss(eva)(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
    assert 0 < v.item() < 2
    blocks = RepAlignLoss(eva, layer_types=None, layer_names=["blocks.*"])
    assert [n for n, _ in blocks.hooked] == ["blocks.0", "blocks.1"]
    _, terms = blocks(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32), return_terms=True)
    assert terms.shape == (2,)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors(vit):
    loss = RepAlignLoss(vit)
    with pytest.raises(ValueError, match="output shape .* != target shape"):
        loss(torch.randn(1, 3, 56, 56), torch.randn(2, 3, 56, 56))
    with pytest.raises(ValueError, match="module types present: .*ReLU"):
        RepAlignLoss(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="no module"):
        RepAlignLoss(vit, layer_names=["nope.*"])
    shaky = RepAlignLoss(vit, normalize=lambda t: t[:, :, :42] if t.requires_grad else t)
    with pytest.raises(ValueError, match="normalize changed shapes inconsistently"):
        shaky(torch.randn(1, 3, 56, 56, requires_grad=True), torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="normalize changed shapes"):
        RepAlignLoss(vit, normalize=lambda t: t[:1])(torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56))
    with pytest.raises(ValueError, match="mode="):
        RepAlignLoss(vit, mode="rms")
    with pytest.raises(ValueError, match="one weight per hooked call"):
        RepAlignLoss(vit, depth_weighting=[1.0, 2.0])(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56))


def test_call_count_mismatch_and_inplace_errors():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            x = self.fc(x)
            return self.fc(x) if x.requires_grad else x

    with pytest.raises(ValueError, match="call-count mismatch"):
        RepAlignLoss(Twice(), early_exit=False)(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3))

    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.fc2(self.fc(x).relu_())

    with pytest.raises(RuntimeError, match="'fc' in place"):
        RepAlignLoss(Inplace())(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3))


def test_one_d_activations_are_skipped_with_a_warning():
    loss = tap_loss(lambda t: t, lambda t: t.sum(1))
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        v = loss(x, y)
        loss(x, y)
    assert sum("1-D activation" in str(r.message) for r in rec) == 1
    assert abs(v.item() - closed_form([x], [y], 2).item()) < 1e-6


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_autocast_and_bf16_targets(vit):
    x, y = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    ref = RepAlignLoss(vit)(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = RepAlignLoss(vit)(x, y)
    assert amp.dtype == torch.float32 and abs(amp.item() - ref) / ref < 1e-2
    low = RepAlignLoss(vit, target_dtype=torch.bfloat16)(x, y).item()
    assert abs(low - ref) / ref < 1e-3


def test_teacher_input_resize_is_a_valid_normalize(vit):
    from dinokit.methods.repalign import TeacherInput

    norm = TeacherInput((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), size=56)
    x, y = torch.rand(2, 3, 64, 64, requires_grad=True), torch.rand(2, 3, 64, 64)
    loss = RepAlignLoss(vit, norm)
    v = loss(x, y)
    v.backward()
    assert x.grad.abs().sum() > 0 and loss(y, y).item() == 0.0
    assert abs(v.item() - RepAlignLoss(vit)(norm(x.detach()), norm(y)).item()) < 1e-6
