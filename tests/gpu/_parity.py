"""Device-parity helpers of the GPU tests: the comparison rule, dtype round trips, training-step bookkeeping.

Every GPU check is a function ``check_xxx(device)`` that compares ``device`` against the CPU. The GPU tests call it
with ``"cuda"``; the CPU self-checks call it with ``"cpu"`` (then the comparison is exact), which proves in CI that
the checks run and that the CPU fp32 path agrees with the fp64 reference they are built on.

The parity rule (:func:`assert_parity`): a probe ``probe(device, dtype) -> {name: tensor}`` is run three times:
``("cpu", float64)`` is the reference, ``("cpu", float32)`` measures fp32's own error on this computation and
``(device, float32)`` is checked. With ``scale = max |ref|`` per output:

    max |dev - ref| <= FACTOR * max |cpu - ref| + FLOOR * scale,      FACTOR = 10, FLOOR = 1e-5

i.e. the device's fp32 result is as close to the fp64 truth as the CPU's fp32 result is (within 10x), or within
1e-5 of the output's scale. Steep computations (soft sorting at steepness 100, gradients) get a tolerance that
follows their real sensitivity instead of a guessed constant; smooth ones are held to 1e-5 relative. The CPU fp32
error itself must stay below ``SANE * scale`` (1e-2): the fp32 path agrees with fp64.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import torch

FACTOR = 10.0
FLOOR = 1e-5
SANE = 1e-2

Probe = Callable[[str, torch.dtype], Mapping[str, torch.Tensor]]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 on the CPU (0 for empty tensors)."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((_f64(a) - _f64(b)).abs().max()) if a.numel() else 0.0


def assert_parity(probe: Probe, device: str, factor: float = FACTOR, floor: float = FLOOR,
                  sane: float = SANE) -> dict[str, tuple[float, float, float]]:
    """Run ``probe`` as (cpu, fp64), (cpu, fp32), (device, fp32) and apply the parity rule to every output.

    Returns {name: (scale, cpu error, device error)} for reporting."""
    ref = probe("cpu", torch.float64)
    cpu = probe("cpu", torch.float32)
    dev = probe(device, torch.float32)
    if set(ref) != set(cpu) or set(ref) != set(dev):
        raise AssertionError(f"probe outputs differ by run: {sorted(ref)} / {sorted(cpu)} / {sorted(dev)}")
    report = {}
    for name in ref:
        r, c, d = ref[name], cpu[name], dev[name]
        if r.numel() == 0:
            assert c.numel() == 0 and d.numel() == 0, name
            continue
        assert torch.isfinite(_f64(d)).all(), f"{name}: non-finite values on {device}"
        scale = float(_f64(r).abs().max())
        e_cpu, e_dev = max_err(c, r), max_err(d, r)
        assert e_cpu <= sane * max(scale, 1e-30), (
            f"{name}: the CPU fp32 result is {e_cpu:.3e} from the fp64 reference (scale {scale:.3e}); the fp32 path "
            "itself is wrong")
        tol = factor * e_cpu + floor * scale
        assert e_dev <= tol, (f"{name}: {device} fp32 is {e_dev:.3e} from the fp64 reference, CPU fp32 {e_cpu:.3e} "
                              f"(scale {scale:.3e}, tolerance {tol:.3e})")
        report[name] = (scale, e_cpu, e_dev)
    return report


def assert_close(name: str, dev: torch.Tensor, cpu: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """max |dev - cpu| <= rtol * max |cpu| + atol (a fixed tolerance, for outputs with no fp64 reference)."""
    scale = float(_f64(cpu).abs().max()) if cpu.numel() else 0.0
    err = max_err(dev, cpu)
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3e} > {rtol:g} x scale {scale:.3e} + {atol:g}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Seeded fp32 CPU normal tensor (inputs are drawn once on the CPU, then moved: same values on every device)."""
    return torch.randn(*shape, generator=generator(seed))


# ------------------------------------------------------------------------------------------ training steps
def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_saved_as_fp32_masters(module: torch.nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    """The state dict keeps its keys and dtypes (floating tensors fp32: the masters, never bf16) and a safetensors
    round trip returns it unchanged."""
    from safetensors.torch import load, save

    sd = module.state_dict()
    assert set(sd) == set(before), "the training step changed the state-dict keys"
    for k, v in sd.items():
        assert v.dtype == before[k].dtype, f"{k}: dtype {before[k].dtype} became {v.dtype}"
        if v.is_floating_point():
            assert v.dtype == torch.float32, f"{k}: master weights must be fp32, got {v.dtype}"
    back = load(save({k: v.detach().cpu().contiguous() for k, v in sd.items()}))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach().cpu()), f"{k}: changed by save/load"
    buf = io.BytesIO()  # Lightning checkpoints are torch.save'd: the same dtypes come back
    torch.save(sd, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    assert all(again[k].dtype == v.dtype for k, v in sd.items())


def assert_trained(named: Mapping[str, torch.nn.Parameter], before: Mapping[str, torch.Tensor]) -> int:
    """Every trainable parameter that got a non-zero fp32 gradient changed; returns how many changed (>= 1)."""
    changed = 0
    for k, p in named.items():
        assert p.dtype == torch.float32, f"{k}: parameter dtype {p.dtype}"
        if p.grad is None:
            continue
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), f"{k}: bad gradient"
        if bool(p.grad.abs().sum() > 0):
            assert not torch.equal(p.detach(), before[k].to(p.device)), f"{k}: had a gradient but did not change"
            changed += 1
    assert changed >= 1, "no parameter changed"
    return changed


def autocast_bf16(device: str):
    """bf16 autocast on ``device`` (CUDA in the GPU tests; the CPU self-check runs the same step on the CPU)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
