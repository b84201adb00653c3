"""Method parity CPU vs CUDA, forward and backward: the RASA head (sequential and folded), the soft sort, the NeCo
loss (alignment + sorting cross-entropy, and the whole NeCo step with fixed references), the Barlow Twins loss and
model, and RepAlign (group and whole modes).

Tolerance: the parity rule of ``_parity`` (device fp32 within 10x the CPU fp32 error from an fp64 reference, or 1e-5
of the output's scale). Where a method computes in fp32 whatever its input (NeCo's head, alignment and loss), the
fp64 reference is composed from the library's own pieces in fp64. bf16 inputs of the RASA head are held to one bf16
step (2^-7) of the output's scale.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from torchvision.ops import roi_align

from dinokit.backbones import load_backbone
from dinokit.methods.barlow_twins import BarlowTwins, BarlowTwinsLoss
from dinokit.methods.neco import NeCo, NeCoConfig, align, pair_loss, similarities, sorting_cross_entropy
from dinokit.methods.neco.softsort import soft_sort
from dinokit.methods.rasa import RASAHead
from dinokit.methods.repalign import RepAlignLoss

from ._parity import assert_close, assert_parity, randn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grads(loss: torch.Tensor, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {f"grad/{k}": (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(named.items(), gs)}


# ----------------------------------------------------------------------------------------------------------- RASA
D_RASA = 64


def _rasa_head() -> RASAHead:
    return RASAHead(D_RASA, stage_weights=randn(3, 2, D_RASA, seed=20) / math.sqrt(D_RASA))


def _probe_rasa(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    head = _rasa_head().to(device)
    x = randn(2, 50, D_RASA, seed=21).to(device, dtype).requires_grad_()
    y, removed, last = head(x, return_components=True)
    out = {"y": y, "removed": removed, "removed_last": last, "y_2_stages": head(x, n_stages=2),
           "folded_lowrank": head.fold("lowrank")(x), "folded_dense": head.fold("dense")(x),
           "position_stage2": head.predict_position(x, stage=2)}
    (g,) = torch.autograd.grad((y * randn(*y.shape, seed=22).to(device, dtype)).sum(), x)
    out["grad/x"] = g
    return out


def check_rasa(device: str) -> None:
    assert_parity(_probe_rasa, device)
    head = _rasa_head()
    xb = randn(2, 50, D_RASA, seed=23).bfloat16()
    cpu, dev = head(xb), head.to(device)(xb.to(device))
    assert dev.dtype == torch.bfloat16
    assert_close("rasa bf16", dev, cpu, rtol=2.0 ** -7)


# ------------------------------------------------------------------------------------------------------ soft sort
def _probe_softsort(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for net, n, s in (("bitonic", 49, 100.0), ("bitonic", 7, 100.0), ("odd_even", 16, 100.0), ("bitonic", 16, 10.0)):
        g = torch.Generator().manual_seed(n * 31 + int(s))
        x0 = torch.rand(6, n, generator=g, dtype=torch.float64) * 2 - 1
        wy, wP = torch.randn(6, n, generator=g), torch.randn(6, n, n, generator=g)
        x = x0.to(device, dtype).requires_grad_()
        y, P = soft_sort(x, s, net)
        (gx,) = torch.autograd.grad((y * wy.to(device, dtype)).sum() + (P * wP.to(device, dtype)).sum(), x)
        key = f"{net}/n{n}/s{s:g}"
        out.update({f"{key}/y": y, f"{key}/P": P, f"{key}/grad": gx})
    return out


def check_softsort(device: str) -> None:
    rep = assert_parity(_probe_softsort, device)
    assert rep["bitonic/n49/s100/P"][0] <= 1.0 + 1e-6  # P is doubly stochastic: entries in [0, 1]


# ----------------------------------------------------------------------------------------------------------- NeCo
def _pair_loss64(t_al: torch.Tensor, s_al: torch.Tensor, refs: torch.Tensor, s: float = 100.0) -> torch.Tensor:
    """pair_loss composed from the library's pieces in fp64 (pair_loss itself always computes in fp32)."""
    tq = t_al.detach().flatten(2).transpose(1, 2)
    sq = s_al.flatten(2).transpose(1, 2)
    with torch.no_grad():
        _, Q = soft_sort(similarities(tq, refs), s)
    _, P = soft_sort(similarities(sq, refs), s, segment=10 ** 9)
    return sorting_cross_entropy(Q, P)


def _probe_neco_loss(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ROIAlign of teacher/student maps to r x r, then the sorting cross-entropy against fixed references."""
    B, E, h, r, p = 2, 8, 4, 3, 16
    maps_t = randn(B, E, h, h, seed=30).to(device, dtype)
    maps_s = (randn(B, E, h, h, seed=30) + 0.3 * randn(B, E, h, h, seed=31)).to(device, dtype).requires_grad_()
    boxes = torch.tensor([[3.0, 5.0, 50.0, 41.0], [0.0, 0.0, 64.0, 64.0]], device=device)
    refs = randn(B, r * r, E, seed=32).to(device, dtype)
    if dtype == torch.float64:  # fp64 reference: the same ROIAlign and loss, in fp64
        rois = torch.cat([torch.arange(B, device=device, dtype=dtype)[:, None], boxes.to(dtype) / p], 1)
        t_al, s_al = (roi_align(m, rois, (r, r), 1.0, -1, True) for m in (maps_t, maps_s))
        loss = _pair_loss64(t_al, s_al, refs)
    else:
        t_al, s_al = align(maps_t, boxes, p, r), align(maps_s, boxes, p, r)
        loss = pair_loss(t_al, s_al, refs)
    (g,) = torch.autograd.grad(loss, maps_s)
    return {"t_aligned": t_al, "s_aligned": s_al, "loss": loss, "grad/student_maps": g}


_NECO = NeCoConfig(head_hidden=32, head_dim=16, roi_size=2, queue_length=64)


@functools.cache
def _neco_cpu() -> tuple[NeCo, dict]:
    from dinokit.data.synthetic import SyntheticScenes
    from dinokit.methods.neco.views import NeCoDataset, NeCoViews, neco_collate

    torch.manual_seed(0)
    model = NeCo(load_backbone("tiny_dino", weights="random"), load_backbone("tiny_dino", weights="random"), _NECO)
    ds = NeCoDataset(SyntheticScenes(2, (48, 48), seed=0), NeCoViews(crops=(2, 2), sizes=(32, 16)))
    return model.train(), neco_collate([ds[i] for i in range(2)])


def _probe_neco_step(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole NeCo forward (teacher and student, heads, alignment, sorting loss) with fixed references, and the
    student gradients. The heads emit fp32 whatever the backbone dtype, so the fp64 run is fp64 up to the heads."""
    base, batch = _neco_cpu()
    model = copy.deepcopy(base).to(device, dtype).train()
    b = {"crops": [c.to(device, dtype) for c in batch["crops"]], "gc": batch["gc"].to(device),
         "all": batch["all"].to(device)}
    refs = torch.nn.functional.normalize(randn(2, _NECO.roi_size ** 2, _NECO.head_dim, seed=40), dim=-1).to(device)
    out = model(b, references=refs)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad and k.startswith(("student.model.blocks.1",
                                                                                            "student_head"))}
    return {"loss": out["loss"], **_grads(out["loss"], named)}


def check_neco(device: str) -> None:
    assert_parity(_probe_neco_loss, device)
    assert_parity(_probe_neco_step, device)


# --------------------------------------------------------------------------------------------------- Barlow Twins
def _probe_bt_loss(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    za = randn(32, 24, seed=50).to(device, dtype).requires_grad_()
    zb = (randn(32, 24, seed=50) + 0.5 * randn(32, 24, seed=51)).to(device, dtype).requires_grad_()
    crit = BarlowTwinsLoss(warn_batch=0)
    loss = crit(za, zb)
    ga, gb = torch.autograd.grad(loss, [za, zb])
    return {"loss": loss, "C": crit.last_c, "on_diag": crit.last_terms["on_diag"], "grad/za": ga, "grad/zb": gb}


@functools.cache
def _bt_cpu() -> BarlowTwins:
    torch.manual_seed(0)
    model = BarlowTwins(load_backbone("tiny_dino", weights="random"), "32-32")
    model.criterion.warn_batch = 0
    return model.train()


def _probe_bt_model(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(_bt_cpu()).to(device, dtype).train()
    x1 = randn(8, 3, 64, 64, seed=52).to(device, dtype)
    x2 = randn(8, 3, 64, 64, seed=53).to(device, dtype)
    loss = model(x1, x2)
    named = {k: p for k, p in model.named_parameters() if k.startswith(("projector", "backbone.model.blocks.1"))}
    out = {"loss": loss, **_grads(loss, named)}
    out.update({f"buffer/{k}": v for k, v in model.named_buffers() if "running" in k})  # BN statistics after the step
    return out


def check_barlow_twins(device: str) -> None:
    assert_parity(_probe_bt_loss, device)
    assert_parity(_probe_bt_model, device)


# ------------------------------------------------------------------------------------------------------- RepAlign
@functools.cache
def _teacher_cpu() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_backbone("tiny_dinov2", weights="random").model.eval()


def _probe_repalign(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    teacher = copy.deepcopy(_teacher_cpu()).to(device, dtype)
    out = {}
    for mode in ("group", "whole"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 1-D activations are skipped with a warning
            loss_fn = RepAlignLoss(teacher, mode=mode)
            x = randn(2, 3, 56, 56, seed=60).to(device, dtype).requires_grad_()
            y = randn(2, 3, 56, 56, seed=61).to(device, dtype)
            loss, terms = loss_fn(x, y, return_terms=True)
        (g,) = torch.autograd.grad(loss, x)
        out.update({f"{mode}/loss": loss, f"{mode}/terms": terms, f"{mode}/grad": g})
        loss_fn.close()
    return out


def check_repalign(device: str) -> None:
    assert_parity(_probe_repalign, device)


CHECKS = [check_rasa, check_softsort, check_neco, check_barlow_twins, check_repalign]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_gpu_methods(check) -> None:
    check("cuda")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_self_check_on_cpu(check) -> None:
    check("cpu")
