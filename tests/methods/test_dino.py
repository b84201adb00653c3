"""DINO self-distillation core: loss identities, centring and EMA formulas, teacher isolation, batched views."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.methods.dino import (
    DINO,
    DINOHead,
    DINOLoss,
    MaskedPatchLoss,
    lr_at,
    momentum_schedule,
    teacher_temperature,
    vit_tokens,
)
from dinokit.methods.dino.views import (
    MultiCropConfig,
    MultiCropViews,
    SceneStream,
    colour_jitter,
    crop_resize,
    gaussian_blur,
    random_patch_masks,
    random_resized_boxes,
    solarize,
)


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch8_224", pretrained=False, embed_dim=16, depth=1, num_heads=2,
                             img_size=16, num_classes=0, dynamic_img_size=True)


def test_dino_loss_with_one_hot_teacher_is_the_cross_entropy_of_the_student():
    """A very cold teacher gives one-hot targets: the loss is then -log softmax(s / tau_s)[argmax t]."""
    torch.manual_seed(1)
    B, K = 5, 7
    s = [torch.randn(B, K) for _ in range(3)]
    t = [torch.randn(B, K) for _ in range(2)]
    loss = DINOLoss(K, student_temp=0.1)(s, t, teacher_temp=1e-4)
    pairs = [(ti, si) for ti in range(2) for si in range(3) if si != ti]
    expected = sum(F.cross_entropy(s[si] / 0.1, t[ti].argmax(-1)) for ti, si in pairs) / len(pairs)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_dino_loss_formula_and_centre_update():
    torch.manual_seed(2)
    B, K = 4, 6
    crit = DINOLoss(K, student_temp=0.2, center_momentum=0.8)
    crit.center.copy_(torch.randn(1, K))
    c0 = crit.center.clone()
    s = [torch.randn(B, K) for _ in range(2)]
    t = [torch.randn(B, K) for _ in range(2)]
    loss = crit(s, t, teacher_temp=0.05)
    q = [F.softmax((x - c0) / 0.05, -1) for x in t]
    lp = [F.log_softmax(x / 0.2, -1) for x in s]
    expected = ((-q[0] * lp[1]).sum(-1).mean() + (-q[1] * lp[0]).sum(-1).mean()) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(crit.center, 0.8 * c0 + 0.2 * torch.cat(t).mean(0, keepdim=True), atol=1e-7)


def test_dino_loss_with_identical_distributions_is_the_entropy():
    """Student = teacher distribution: the cross-entropy equals the entropy of that distribution."""
    K = 5
    logits = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    crit = DINOLoss(K, student_temp=1.0)
    loss = crit([logits, logits], [logits, logits], teacher_temp=1.0)
    p = F.softmax(logits, -1)
    assert torch.allclose(loss, -(p * p.log()).sum(-1).mean(), atol=1e-6)


def test_masked_patch_loss_counts_masked_cells_only():
    torch.manual_seed(4)
    B, N, K = 3, 4, 5
    s, t = torch.randn(B, N, K), torch.randn(B, N, K)
    m = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    crit = MaskedPatchLoss(K, student_temp=0.1, center_momentum=0.5)
    loss = crit([s], [t], [m], teacher_temp=0.07)
    ce = (-F.softmax(t / 0.07, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)
    per_image = [(ce[0, 0] + ce[0, 3]) / 2, torch.tensor(0.0), ce[2].mean()]
    assert torch.allclose(loss, torch.stack(per_image).mean(), atol=1e-6)
    assert torch.allclose(crit.center, 0.5 * t.reshape(-1, K).mean(0, keepdim=True), atol=1e-7)
    s2 = s.clone()
    s2[0, 1] += 10  # an unmasked cell: no effect
    assert torch.allclose(MaskedPatchLoss(K)([s2], [t], [m], 0.07), MaskedPatchLoss(K)([s], [t], [m], 0.07))


def test_head_last_layer_is_a_cosine_with_unit_prototypes():
    head = DINOHead(8, out_dim=11, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(6, 8)
    z = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    assert torch.allclose(head(x), z @ F.normalize(v, dim=1).T, atol=1e-6)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert head(x).abs().max() <= 1 + 1e-6


def test_teacher_is_an_ema_of_the_student_and_gets_no_gradient():
    model = DINO(_tiny_vit(), out_dim=12, hidden_dim=16, bottleneck_dim=8, patch_weight=1.0, patch_out_dim=10)
    teacher_before = [p.clone() for p in model.teacher_parameters()]
    g = torch.Generator().manual_seed(0)
    glob = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)]
    loc = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)]
    masks = [random_patch_masks(2, (2, 2), (0.5, 0.5), 1.0, g) for _ in range(2)]
    out = model(glob, loc, masks, teacher_temp=0.04)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher_parameters())
    assert not any(p.requires_grad for p in model.teacher_parameters())
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert torch.allclose(out["loss"], out["cls_loss"] + out["patch_loss"])
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(0.5)
    student = [p.clone() for _, s in model._pairs() for p in s.parameters()]
    model.update_teacher(0.9)
    for t0, s, t1 in zip(teacher_before, student, model.teacher_parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_vit_tokens_match_timm_and_mask_replaces_patch_embeddings():
    vit = _tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit_tokens(vit, x), vit.forward_features(x), atol=1e-6)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    tok = torch.randn(16)
    assert torch.allclose(vit_tokens(vit, x, mask, tok), vit.forward_features(x), atol=1e-6)
    mask[0, 0, 0] = True
    y = vit_tokens(vit, x, mask, tok)
    x2 = x.clone()
    x2[0, :, :8, :8] = 0
    assert not torch.allclose(y[0], vit.forward_features(x)[0])
    assert torch.allclose(y[1], vit.forward_features(x)[1], atol=1e-6)


def test_schedules():
    assert teacher_temperature(0, 10) == 0.04 and teacher_temperature(5, 10) == pytest.approx(0.055)
    assert teacher_temperature(10, 10) == 0.07 and teacher_temperature(3, 0) == 0.07
    assert momentum_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_schedule(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_schedule(100, 100, 0.996) == 1.0
    assert lr_at(5, 100, 10, 1.0) == 0.5
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)


def test_crop_resize_full_box_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)
    assert torch.allclose(crop_resize(x, full, 8), x, atol=1e-6)
    flipped = crop_resize(x, full, 8, torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-6) and torch.allclose(flipped[1], x[1], atol=1e-6)
    # the top-left quarter at half the size samples exactly the pixel centres of x[:4, :4] (align_corners=False)
    quarter = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    assert torch.allclose(crop_resize(x[:1], quarter, 4), x[:1, :, :4, :4], atol=1e-6)


def test_random_resized_boxes_respect_scale_and_bounds():
    b = random_resized_boxes(500, (0.1, 0.4), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    cx, cy, w, h = b.unbind(1)
    assert ((cx - w / 2) >= -1e-6).all() and ((cx + w / 2) <= 1 + 1e-6).all()
    assert ((cy - h / 2) >= -1e-6).all() and ((cy + h / 2) <= 1 + 1e-6).all()
    area = w * h
    assert (area >= 0.1 - 1e-5).all() and (area <= 0.4 + 1e-5).all()
    r = w / h
    assert (r >= 0.75 - 1e-5).all() and (r <= 4 / 3 + 1e-5).all()


def test_photometric_ops_identities():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    cfg = MultiCropConfig(p_jitter=0.0, p_gray=0.0)
    assert torch.equal(colour_jitter(x, cfg, g), x)
    gray = colour_jitter(x, MultiCropConfig(p_jitter=0.0, p_gray=1.0), g)
    assert torch.allclose(gray, (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x), atol=1e-6)
    zero_jitter = MultiCropConfig(brightness=0, contrast=0, saturation=0, hue=0, p_jitter=1.0, p_gray=0.0)
    assert torch.allclose(colour_jitter(x, zero_jitter, g), x, atol=1e-5)  # YIQ round trip
    const = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(const, 1.0, (0.5, 1.5), g), const, atol=1e-6)
    assert torch.equal(gaussian_blur(x, 0.0, (0.5, 1.5), g), x)
    s = solarize(x, 1.0, g)
    assert torch.equal(s, torch.where(x >= 0.5, 1 - x, x))


def test_multicrop_views_shapes_and_determinism():
    imgs = (torch.rand(3, 3, 16, 16) * 255).to(torch.uint8)
    v = MultiCropViews(MultiCropConfig(global_size=16, local_size=8, n_local=3))
    g1, l1 = v(imgs, torch.Generator().manual_seed(5))
    g2, l2 = v(imgs, torch.Generator().manual_seed(5))
    assert [t.shape for t in g1] == [(3, 3, 16, 16)] * 2 and [t.shape for t in l1] == [(3, 3, 8, 8)] * 3
    assert all(torch.equal(a, b) for a, b in zip(g1 + l1, g2 + l2))


def test_patch_masks_count():
    m = random_patch_masks(200, (4, 4), (0.25, 0.25), 0.5, torch.Generator().manual_seed(0))
    counts = m.flatten(1).sum(1)
    assert set(counts.tolist()) <= {0, 4}
    assert 60 < int((counts == 4).sum()) < 140


def test_scene_stream_is_the_benchmark_with_fine_grained_every_kth():
    from dinokit.data.synthetic import render_scene

    ds = SceneStream(8, 32, seed=11, fine_every=4)
    assert torch.equal(ds[1], torch.from_numpy(render_scene(11, 1, (32, 32)).image).permute(2, 0, 1))
    assert torch.equal(ds[3], torch.from_numpy(render_scene(11, 3, (32, 32), fine_grained=True).image)
                       .permute(2, 0, 1))
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(ValueError, match="fine_every"):
        SceneStream(4, fine_every=-1)


def test_errors():
    with pytest.raises(ValueError, match="at least one global"):
        MultiCropConfig(n_global=0)
    with pytest.raises(ValueError, match=">= 1 teacher"):
        DINOLoss(3)([torch.randn(2, 3)], [torch.randn(2, 3)], 0.04)
    model = DINO(_tiny_vit(), out_dim=6, hidden_dim=8, bottleneck_dim=4, patch_weight=1.0, patch_out_dim=5)
    with pytest.raises(ValueError, match="mask per global view"):
        model([torch.randn(2, 3, 16, 16)] * 2)
    assert math.isfinite(float(model([torch.randn(2, 3, 16, 16)] * 2, (),
                                     [torch.zeros(2, 2, 2, dtype=torch.bool)] * 2)["loss"]))


def test_pretrain_command_is_reproducible_and_records_provenance(tmp_path):
    import json

    from dinokit.backbones import load_backbone
    from dinokit.backbones import weights as W
    from dinokit.cli import main

    args = ["pretrain", "--steps", "2", "--batch_size", "4", "--n_local", "1", "--warmup_steps", "1",
            "--out_dim", "32", "--patch_out_dim", "16", "--hidden_dim", "32", "--bottleneck_dim", "8",
            "--log_every", "1", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    fa, fb = tmp_path / "a" / "demo_vit.safetensors", tmp_path / "b" / "demo_vit.safetensors"
    assert fa.read_bytes() == fb.read_bytes()  # same seed and threads: byte-identical weights file
    prov = json.loads((tmp_path / "a" / "demo_vit.json").read_text())
    assert prov["sha256"] == W.sha256(fa) and prov["steps"] == 2 and prov["images_seen"] == 8
    assert prov["meta"]["config"]["seed"] == 0 and "torch" in json.dumps(prov["meta"]["versions"])
    bb = load_backbone(weights=str(fa))
    assert bb.name == "demo_vit" and bb.weights_info["source"] == "file"
