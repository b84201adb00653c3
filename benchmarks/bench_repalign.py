"""Benchmark: streamed RepAlignLoss against the naive two-list implementation (upstream's design).

Both compute the same group-mode loss (g = 2, global mean) of ``output`` against ``target`` through a small random
ViT teacher (timm DINOv2 ViT/14 architecture, ``--dim`` 192 = ViT-Ti width, ``--depth`` 4 blocks, 224^2, batch 8 by
default). Reported per step
(forward + backward of the loss w.r.t. ``output``):

- memory: on CPU, the bytes of the unique storages saved for backward (``saved_tensors_hooks``) plus the activation
  lists the implementation holds (teacher parameters excluded), measured at the end of the loss forward (its peak);
  on GPU, ``torch.cuda.max_memory_allocated`` above the inputs and model. The bare teacher graph (one forward with
  grad) is printed as the floor.
- time: median seconds per step, the two implementations interleaved step by step.

Run: ``.venv/bin/python benchmarks/bench_repalign.py`` (``--device cuda --amp`` on a GPU; ``--dim 384 --depth 12``
is ViT-S/14, ``--dim 768 --depth 12`` ViT-B/14; ``--size`` sets the input side; ``--json PATH`` also writes the
figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.backbones import load_backbone
from dinokit.methods.repalign import RepAlignLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402


class NaiveRepAlign:
    """Upstream-style: hooks collect two full activation lists, then pad + normalise + element MSE per pair."""

    def __init__(self, teacher: nn.Module, group_size: int = 2):
        self.teacher, self.g = teacher, group_size
        self.acts: list[torch.Tensor] = []
        self.target_acts: list[torch.Tensor] = []
        self.student_acts: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(lambda m, a, o: self.acts.append(o))
                        for m in teacher.modules() if isinstance(m, nn.Conv2d | nn.Linear)]

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        f = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t[:, None]
        pad = (-f.shape[-1]) % self.g
        f = F.pad(f.float(), (0, pad))
        return F.normalize(f.reshape(f.shape[0], f.shape[1], -1, self.g), dim=-1, eps=1e-12)

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.acts.clear()
        with torch.no_grad():
            self.teacher(target)
        self.target_acts = list(self.acts)
        self.acts.clear()
        self.teacher(output)
        self.student_acts = list(self.acts)
        self.acts.clear()
        total, count = 0.0, 0
        for x, y in zip(self.student_acts, self.target_acts, strict=True):
            xg, yg = self._groups(x), self._groups(y)
            total = total + (xg - yg).square().sum()
            count += xg.numel()
        return total / count  # element mean incl. padding == mean(1 - cos) at g = 2

    def held(self) -> list[torch.Tensor]:
        return self.target_acts + self.student_acts

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class SavedBytes:
    """Sum of the unique storages packed for backward inside the context (plus extra held tensors).

    Storages of ``skip`` (the teacher's parameters, the same for every implementation) are not counted.
    """

    def __init__(self, skip: list[torch.Tensor]):
        self.storages: dict[int, int] = {}
        self.skip = {p.untyped_storage().data_ptr() for p in skip}

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.storages[s.data_ptr()] = s.nbytes()

    def __enter__(self):
        def pack(t):
            self.add(t)
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def make_teacher(depth: int, dim: int, device: str, size: int = 224) -> nn.Module:
    """A random ViT/14 of the DINOv2 architecture (64-dim heads), size^2 input."""
    bb = load_backbone("dinov2_vits14", "random", device=device,
                       model_kwargs=dict(depth=depth, embed_dim=dim, num_heads=max(1, dim // 64), img_size=size))
    return bb.model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4, help="blocks of the ViT/14 teacher")
    p.add_argument("--dim", type=int, default=192, help="embedding width of the teacher (192: ViT-Ti, 384: ViT-S)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="input side (a multiple of 14)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    teacher = make_teacher(args.depth, args.dim, args.device, args.size)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev, requires_grad=True)
    y = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    naive, ours = NaiveRepAlign(teacher), RepAlignLoss(teacher)
    ours_bf16 = RepAlignLoss(teacher, target_dtype=torch.bfloat16)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp)

    def step(fn) -> tuple[float, torch.Tensor]:
        x.grad = None
        with amp:
            loss = fn(x, y)
        loss.backward()
        return loss.item(), x.grad.clone()

    # equal loss and gradients
    (ln, gn), (lo, go) = step(naive), step(ours)
    print(f"loss naive {ln:.9f}  dinokit {lo:.9f}  |diff| {abs(ln - lo):.2e}  max|grad diff| "
          f"{(gn - go).abs().max().item():.2e} (grad scale {gn.abs().max().item():.2e})")
    assert abs(ln - lo) <= 1e-6, "losses differ"

    # memory
    def mem(fn, held=None) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        x.grad = None
        with SavedBytes(list(teacher.parameters())) as sb, amp:
            loss = fn(x, y)
        for t in held() if held else []:
            sb.add(t)
        mb = sb.mb
        loss.backward()
        return mb

    def bare(xx, yy):
        teacher(xx)
        return xx.sum() * 0

    m_bare = mem(bare)
    m_naive = mem(naive, naive.held)
    m_ours = mem(ours)
    m_bf16 = mem(ours_bf16)
    unit = "MB peak allocated" if dev.type == "cuda" else "MB saved-for-backward + held, parameters excluded"
    print(f"memory ({unit}): bare teacher graph {m_bare:.1f}; naive {m_naive:.1f}; dinokit {m_ours:.1f} "
          f"(ratio {m_ours / m_naive:.3f}); dinokit target_dtype=bf16 {m_bf16:.1f} (ratio {m_bf16 / m_naive:.3f})")

    # time, interleaved
    tn, to = [], []
    for _ in range(args.steps):
        for fn, acc in ((naive, tn), (ours, to)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(fn)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            acc.append(time.perf_counter() - t0)
    mn, mo = statistics.median(tn), statistics.median(to)
    print(f"time per step (median of {args.steps}): naive {mn:.3f} s; dinokit {mo:.3f} s (ratio {mo / mn:.3f})")
    result = {"device": args.device, "amp": args.amp, "batch": args.batch, "depth": args.depth, "dim": args.dim,
              "loss_abs_diff": abs(ln - lo), "mem_naive_mb": round(m_naive, 1), "mem_dinokit_mb": round(m_ours, 1),
              "mem_bare_mb": round(m_bare, 1), "mem_ratio": round(m_ours / m_naive, 3),
              "mem_ratio_bf16_targets": round(m_bf16 / m_naive, 3), "time_naive_s": round(mn, 3),
              "time_dinokit_s": round(mo, 3), "time_ratio": round(mo / mn, 3)}
    naive.close()
    print(json.dumps(result))
    if args.json:
        write_figures(args.json, "bench_repalign", args, {**result, "size": args.size})


if __name__ == "__main__":
    main()
