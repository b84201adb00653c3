"""RepAlign example core, demo stage, and the streamed design's memory (bytes saved for backward, not time)."""

import torch
from torch import nn

from dinokit.backbones import load_backbone
from dinokit.data.synthetic import SyntheticScenes
from dinokit.demo.context import DemoContext
from dinokit.demo.repalign import (
    TinyDenoiser,
    add_noise,
    psnr,
    run_restoration,
    scene_tensors,
    teacher_cosine,
)
from dinokit.methods.repalign import RepAlignLoss, TeacherInput, repalign_terms


def test_metrics_known_answers():
    clean = torch.full((2, 3, 8, 8), 0.5)
    assert abs(psnr(clean + 0.1, clean) - 20.0) < 1e-4
    assert torch.equal(add_noise(clean, 0.1, 3), add_noise(clean, 0.1, 3))
    bb = load_backbone("demo_vit", "random")
    norm = TeacherInput(bb.mean, bb.std)
    x = torch.rand(2, 3, 32, 32)
    assert abs(teacher_cosine(bb.model, norm, x, x) - 1) < 1e-5
    assert torch.equal(TinyDenoiser(8)(x), x)  # zero-initialised last conv: starts as the identity
    resized = TeacherInput(bb.mean, bb.std, size=16)(x)
    assert resized.shape == (2, 3, 16, 16)


def test_run_restoration_is_deterministic_and_reports_all_rows():
    bb = load_backbone("demo_vit", "random")
    train = scene_tensors(SyntheticScenes(8, (32, 32), seed=0))
    test = scene_tensors(SyntheticScenes(4, (32, 32), seed=2))
    kw = dict(steps=3, batch=4, width=8, seed=1)
    a = run_restoration(bb.model, bb.mean, bb.std, train, test, **kw)
    b = run_restoration(bb.model, bb.mean, bb.std, train, test, **kw)
    assert list(a) == ["noisy input", "L1", "L1+RepAlign"]
    for k in a:
        assert (a[k].psnr, a[k].teacher_cos) == (b[k].psnr, b[k].teacher_cos)
        assert 10 < a[k].psnr < 60 and -1 <= a[k].teacher_cos <= 1
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_demo_stage_quick(tmp_path):
    from dinokit.demo import repalign

    ctx = DemoContext(tmp_path, seed=0, n_images=16, image_size=32, device="cpu", quick=True)
    out = repalign.run(ctx)
    assert out["weights"] == "random" and "RANDOM" in ctx.sections[-1].text
    assert {"L1/psnr", "L1_RepAlign/psnr", "noisy_input/teacher_cos"} <= set(out)


class _Saved:
    """Unique storages saved for backward (teacher parameters excluded)."""

    def __init__(self, skip):
        self.storages, self.skip = {}, {p.untyped_storage().data_ptr() for p in skip}

    def add(self, t):
        if t.untyped_storage().data_ptr() not in self.skip:
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def __enter__(self):
        self._h = torch.autograd.graph.saved_tensors_hooks(lambda t: (self.add(t), t)[1], lambda t: t)
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        self._h.__exit__(*exc)


def test_streamed_loss_keeps_less_than_two_lists():
    """Bytes saved for backward + held lists: streamed <= 0.7x the two-list path (same loss)."""
    teacher = load_backbone("tiny_dinov2", "random").model
    x, y = torch.randn(2, 3, 56, 56, requires_grad=True), torch.randn(2, 3, 56, 56)
    with _Saved(teacher.parameters()) as ours:
        lo = RepAlignLoss(teacher)(x, y)
    acts = []
    hs = [m.register_forward_hook(lambda m, a, o: acts.append(o)) for m in teacher.modules()
          if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        teacher(y)
    ys, acts = acts, []
    with _Saved(teacher.parameters()) as naive:
        teacher(x)
        ln = repalign_terms(acts, ys)[0]
    for h in hs:
        h.remove()
    for t in ys + acts:
        naive.add(t)
    assert abs(lo.item() - ln.item()) < 1e-6
    assert sum(ours.storages.values()) <= 0.7 * sum(naive.storages.values())


def test_demo_stage_uses_a_cached_trained_teacher_without_freezing_it(tmp_path):
    from dinokit.demo import repalign

    ctx = DemoContext(tmp_path, seed=0, n_images=16, image_size=32, device="cpu", quick=True)
    cached = load_backbone("demo_vit", "random")
    ctx.cache["bt_backbone"] = cached
    out = repalign.run(ctx)
    assert out["weights"] == "trained" and "Barlow Twins" in ctx.sections[-1].text
    assert all(p.requires_grad for p in cached.parameters())  # the stage trained against a copy
