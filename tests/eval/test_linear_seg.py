"""Linear segmentation probe: linearity identity, ignore handling, separable / oracle features (docs/eval/linear.md)."""

import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.linear_seg import StackedLinearHeads, linear_probe, segmentation_loss, sliding_window_logits

from ._synthetic import noisy_oracle, stripes


def test_upsample_then_conv_equals_conv_then_upsample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 7, generator=g)
    conv = torch.nn.Conv2d(16, 4, 1)
    a = conv(F.interpolate(x, size=(23, 31), mode="bilinear", align_corners=False))
    b = F.interpolate(conv(x), size=(23, 31), mode="bilinear", align_corners=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_ignored_pixels_do_not_change_the_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (1, 4, 4), generator=g)
    target[0, :2] = 255
    base = segmentation_loss(logits, target)
    # with logits at label resolution, changing the logits of ignored pixels changes nothing
    changed = logits.clone()
    changed[..., :2, :] += 10 * torch.randn(1, 3, 2, 4, generator=g)
    assert torch.allclose(segmentation_loss(changed, target), base)
    assert segmentation_loss(logits, torch.full((1, 4, 4), 255)) == 0


def test_separable_and_oracle_features():
    cells, masks = stripes(16, seed=0)
    vcells, vmasks = stripes(8, seed=1)
    r = linear_probe(noisy_oracle(cells, 4, 0.05), masks, noisy_oracle(vcells, 4, 0.05, seed=1), vmasks, 4,
                     lrs=(0.001, 1.0), epochs=6, batch_size=4, eval_size=None)
    assert r.metrics["miou"] >= 0.95 and r.metrics["best_lr"] == 1.0
    assert set(r.curves) == {"lr0.001", "lr1"} and len(r.curves["lr1"]["val_miou"]) == 6
    oracle = linear_probe(noisy_oracle(cells, 4, 0), masks, noisy_oracle(vcells, 4, 0), vmasks, 4, lrs=(1.0,),
                          epochs=6, batch_size=4, eval_size=None)
    assert oracle.metrics["miou"] == 1.0


def test_full_protocol_and_sliding_window():
    cells, masks = stripes(16, seed=2)
    r = linear_probe(noisy_oracle(cells, 4, 0.05), masks, noisy_oracle(cells, 4, 0.05, seed=3), list(masks), 4,
                     protocol="full", iterations=40, warmup=5, batch_size=8, lrs=(5e-2,))
    assert r.metrics["miou"] >= 0.9
    heads = StackedLinearHeads(16, 4, 1)
    img = torch.randn(1, 3, 40, 56)
    out = sliding_window_logits(lambda x: x[:, :1].expand(-1, 16, -1, -1)[..., ::8, ::8].permute(0, 2, 3, 1),
                                heads.heads[0], img, crop=24, stride=16, num_classes=4)
    assert out.shape == (1, 4, 40, 56) and torch.isfinite(out).all()


def test_bad_inputs():
    cells, masks = stripes(4)
    with pytest.raises(ValueError, match="outside the class set"):
        linear_probe(noisy_oracle(cells, 4, 0), masks + 5, noisy_oracle(cells, 4, 0), masks, 4, epochs=1)
    with pytest.raises(ValueError, match="D=16"):
        linear_probe(noisy_oracle(cells, 4, 0), masks, torch.zeros(4, 6, 6, 8), masks, 4, epochs=1)


def test_lightning_module_one_epoch():
    import lightning as L

    from dinokit.eval.lightning import LinearSegModule

    cells, masks = stripes(8, seed=4)
    feats = noisy_oracle(cells, 4, 0.05)
    dl = torch.utils.data.DataLoader(list(zip(feats, masks, strict=True)), batch_size=4)
    mod = LinearSegModule(16, 4, lrs=(0.1, 1.0), steps=4, epochs=2, steps_per_epoch=2)
    before = [p.detach().clone() for p in mod.parameters()]
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(mod, dl)
    assert all(not torch.equal(a, b) for a, b in zip(before, mod.parameters(), strict=True))
