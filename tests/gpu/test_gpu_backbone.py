"""Backbone parity CPU vs CUDA on the tiny test models: patch/CLS/register tokens and their gradients, CLS attention
(hooked and unfused paths), q/k/v facets (RoPE before and after, DINOv3).

Tolerance: the parity rule of ``_parity`` (device fp32 within 10x the CPU fp32 error from an fp64 reference, or 1e-5
of the output's scale); gradients are compared per parameter, each against its own scale.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from dinokit.backbones import load_backbone

from ._parity import assert_parity, randn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODELS = ("tiny_dino", "tiny_dinov2_reg", "tiny_dinov3")  # learned positions, registers, RoPE + registers


@functools.cache
def _backbone(name: str):
    torch.manual_seed(0)
    return load_backbone(name, weights="random").eval()


def _probe_features(name: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tokens of forward_features and the gradients of a fixed random linear functional of them (input and every
    parameter)."""
    bb = copy.deepcopy(_backbone(name)).to(device, dtype)
    S = bb.default_input_size
    x = randn(2, 3, S, S, seed=1).to(device, dtype).requires_grad_()
    f = bb.forward_features(x)
    out = {"patch": f.patch, "cls": f.cls, "registers": f.registers}
    loss = sum((t * randn(*t.shape, seed=10 + i).to(device, dtype)).sum() for i, t in enumerate(out.values()))
    names = [n for n, p in bb.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *(dict(bb.named_parameters())[n] for n in names)])
    out["grad/input"] = grads[0]
    out.update({f"grad/{n}": g for n, g in zip(names, grads[1:])})
    return out


def _probe_attention(name: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    bb = copy.deepcopy(_backbone(name)).to(device, dtype)
    S = bb.default_input_size
    x = randn(2, 3, S, S, seed=2).to(device, dtype)
    out = {}
    for block in (0, -1):
        a = bb.attention(x, block=block)
        full = bb.attention(x, block=block, full=True)
        out[f"b{block}/cls"], out[f"b{block}/prefix"] = a.cls, a.prefix
        out[f"b{block}/full_cls"], out[f"b{block}/full"] = full.cls, full.full
    _, a1 = bb(x, attention_block=-1)  # features and attention from one pass
    out["one_pass/cls"] = a1.cls
    return out


def _probe_facets(name: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    bb = copy.deepcopy(_backbone(name)).to(device, dtype)
    S = bb.default_input_size
    x = randn(2, 3, S, S, seed=3).to(device, dtype)
    out = {}
    for rope in ("pre", "post"):
        f = bb.facets(x, block=-1, rope=rope)
        out.update({f"{rope}/{k}": f[k] for k in ("q", "k", "v", "tokens")})
    return out


def check_features(device: str) -> None:
    for name in MODELS:
        assert_parity(functools.partial(_probe_features, name), device)


def check_attention(device: str) -> None:
    for name in MODELS:
        rep = assert_parity(functools.partial(_probe_attention, name), device)
        assert rep["b-1/cls"][0] <= 1.0  # probabilities


def check_facets(device: str) -> None:
    for name in MODELS:
        assert_parity(functools.partial(_probe_facets, name), device)


CHECKS = [check_features, check_attention, check_facets]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_gpu_backbone(check) -> None:
    check("cuda")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_self_check_on_cpu(check) -> None:
    check("cpu")


def test_parity_rule_catches_a_wrong_device_result() -> None:
    """The rule is not vacuous: a 1e-3 relative error on one output fails, the exact CPU result passes."""
    ref = torch.linspace(-1, 1, 50, dtype=torch.float64)

    def probe(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        y = (ref * 3).to(dtype)
        if device == "bad":
            y = y + 1e-3 * 3
        return {"y": y}

    assert_parity(probe, "cpu")
    with pytest.raises(AssertionError, match="bad fp32 is"):
        assert_parity(probe, "bad")
