"""One bf16-autocast training step on the device for NeCo, Barlow Twins, a segmentation head and the classifier.

Each step asserts: the loss is fp32 and finite; every trainable parameter is fp32, got a finite fp32 gradient and,
when that gradient is non-zero, changed; frozen weights did not change (NeCo's teacher moves only by its EMA, checked
against the closed form m teacher + (1 - m) student); the state dict keeps its keys and dtypes (fp32 masters) through
a safetensors and a torch.save round trip.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinokit.backbones import load_backbone
from dinokit.data.synthetic import SyntheticScenes
from dinokit.methods import barlow_twins as BT
from dinokit.methods import classifier as K
from dinokit.methods import neco as N
from dinokit.methods.neco.views import NeCoDataset, NeCoViews, neco_collate
from dinokit.methods.seg_heads import build_head, segmentation_loss

from ._parity import assert_saved_as_fp32_masters, assert_trained, autocast_bf16, randn, state_snapshot

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step(module: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn, device: str) -> torch.Tensor:
    with autocast_bf16(device):
        loss = loss_fn()
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss)), f"loss {loss}"
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def check_neco_step(device: str) -> None:

    torch.manual_seed(0)
    cfg = N.NeCoConfig(head_hidden=32, head_dim=16, roi_size=2, queue_length=64)
    model = N.NeCo(load_backbone("tiny_dino", weights="random"), load_backbone("tiny_dino", weights="random"), cfg)
    model = model.to(device).train()
    ds = NeCoDataset(SyntheticScenes(4, (48, 48), seed=0), NeCoViews(crops=(2, 2), sizes=(32, 16)))
    batch = neco_collate([ds[i] for i in range(4)])
    batch = {"crops": [c.to(device) for c in batch["crops"]], "gc": batch["gc"].to(device),
             "all": batch["all"].to(device)}
    opt = torch.optim.AdamW(N.param_groups(model.student, model.student_head, 1e-3, 1e-3))
    before = state_snapshot(model)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out: dict = {}

    def loss_fn():
        out.update(model(batch))
        return out["loss"]

    _step(model, opt, loss_fn, device)
    assert all(k.startswith(("student.", "student_head.")) for k in trainable)
    assert_trained(trainable, before)
    teacher = [k for k, _ in model.named_parameters() if k.startswith(("teacher.", "teacher_head."))]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], before[k].to(device)) for k in teacher), "the frozen teacher changed"
    model.commit_queues(out)
    assert int(model.queues[0].count) > 0
    m = model.ema_step(0, 10)
    sd = model.state_dict()
    for k in teacher:
        s = "student" + k[len("teacher"):]
        expect = m * before[k].to(device) + (1 - m) * sd[s]
        assert torch.allclose(sd[k], expect, rtol=0, atol=1e-6), f"{k}: not the EMA of the student"
    assert_saved_as_fp32_masters(model, before)


def check_barlow_twins_step(device: str) -> None:

    torch.manual_seed(0)
    model = BT.BarlowTwins(load_backbone("tiny_dino", weights="random"), "32-32").to(device).train()
    model.criterion.warn_batch = 0
    x1, x2 = randn(8, 3, 64, 64, seed=1).to(device), randn(8, 3, 64, 64, seed=2).to(device)
    opt = torch.optim.AdamW(BT.param_groups(model, 1e-5), lr=1e-3)
    before = state_snapshot(model)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    _step(model, opt, lambda: model(x1, x2), device)
    n = assert_trained(trainable, before)
    assert n == len(trainable)  # backbone and projector all learn
    sd = model.state_dict()
    assert int(sd["projector.1.num_batches_tracked"]) == 2 and not torch.equal(  # one BN update per view
        sd["projector.1.running_mean"], before["projector.1.running_mean"].to(device))
    assert_saved_as_fp32_masters(model, before)


def check_seg_head_step(device: str) -> None:

    torch.manual_seed(0)
    bb = load_backbone("tiny_dino", weights="random").to(device).eval().requires_grad_(False)
    head = build_head("setr_pup", bb.embed_dim, 3, bb.patch_size, channels=8).to(device).train()
    x = randn(4, 3, 64, 64, seed=3).to(device)
    y = torch.randint(0, 3, (4, 64, 64), generator=torch.Generator().manual_seed(4))
    y[:, :4] = 255  # ignored pixels
    y = y.to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    bb_before, before = state_snapshot(bb), state_snapshot(head)
    trainable = dict(head.named_parameters())

    def loss_fn():
        with torch.no_grad():
            f = bb.forward_features(x)
        return segmentation_loss(head(f), y, "ce+dice")

    _step(head, opt, loss_fn, device)
    assert assert_trained(trainable, before) == len(trainable)
    assert all(torch.equal(v, bb_before[k]) for k, v in bb.state_dict().items()), "the frozen backbone changed"
    assert_saved_as_fp32_masters(head, before)


def check_classifier_step(device: str) -> None:

    torch.manual_seed(0)
    model = K.build_classifier("resnet10t", 5, "random", dict(channels=(8, 16, 32, 64), stem_width=8))
    model = model.to(device).train()
    cfg = K.RecipeConfig()
    ema = K.EmaEvery(model, cfg.ema_decay, cfg.ema_every)
    opt = torch.optim.SGD(K.param_groups(model, cfg.weight_decay), lr=0.05, momentum=cfg.momentum)
    x = randn(4, 3, 64, 64, seed=5).to(device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    before = state_snapshot(model)
    trainable = dict(model.named_parameters())
    _step(model, opt, lambda: F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing), device)
    assert_trained(trainable, before)  # (zero-initialised last BN of each block: its conv gets no gradient yet)
    assert K.bn_in_train_mode(model)
    assert ema.maybe_update(model, 0)  # batch 0: the first update copies the weights (BN buffers included)
    sd, esd = model.state_dict(), ema.module.state_dict()
    assert all(torch.equal(esd[k], v) for k, v in sd.items())
    assert_saved_as_fp32_masters(model, before)
    assert_saved_as_fp32_masters(ema.module, before)


CHECKS = [check_neco_step, check_barlow_twins_step, check_seg_head_step, check_classifier_step]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_gpu_training_step(check) -> None:
    check("cuda")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_self_check_on_cpu(check) -> None:
    check("cpu")
