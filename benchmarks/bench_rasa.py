"""RASA inference cost: folded operator vs sequential stages, and the head's overhead over the backbone forward.

Part 1 (T=9 stages, D=768, 1369 tokens = 37x37, batch 32, fp32): the sequential reference head (bases cached), an
upstream-style transcription (rows normalised + Gram-Schmidt + elementwise projection in every forward), and the
folded operator in its low-rank (y = x - (xQ)(G Q^T), the default for 8T < D) and dense (y = x L) forms.
Part 2: the folded head on the patch tokens of a ViT-B/14-sized random timm model at 518 px vs the model's forward.

Run: ``.venv/bin/python benchmarks/bench_rasa.py [--quick]`` (prints both figures and their ratio; about 2 min on
2 busy CPU cores). ``--device cuda`` times both parts on a GPU (synchronised); ``--p1-*`` set part 1's sizes,
``--arch``/``--size``/``--batch`` part 2's; ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dinokit.methods.rasa import RASAHead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402

DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA work synchronised before each clock read)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def upstream_style(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-forward normalisation + Gram-Schmidt + elementwise projection, stage by stage (the obvious baseline)."""
    for W in weights:
        a = W[0] / W[0].norm()
        b = W[1] / W[1].norm()
        b = b - (b @ a) * a
        b = b / b.norm()
        x = x - (x @ a)[..., None] * a - (x @ b)[..., None] * b
    return x


def part1(B: int, N: int, D: int, T: int, repeats: int) -> dict:
    torch.manual_seed(0)
    head = RASAHead(D, stage_weights=torch.randn(T, 2, D) / D**0.5).to(DEVICE)
    x = torch.randn(B, N, D).to(DEVICE)
    low, dense = head.fold("lowrank"), head.fold("dense")
    with torch.no_grad():
        ref = head(x)
        err = {"lowrank": float((low(x) - ref).abs().max()), "dense": float((dense(x) - ref).abs().max()),
               "upstream-style": float((upstream_style(x, head.stage_weights) - ref).abs().max())}
        t_seq = timeit(lambda: head(x), repeats)
        t_up = timeit(lambda: upstream_style(x, head.stage_weights), max(1, repeats - 1))
        t_low = timeit(lambda: low(x), repeats)
        t_dense = timeit(lambda: dense(x), max(1, repeats // 2))
    print(f"== part 1: T={T}, D={D}, tokens={N}, batch={B}, fp32, {torch.get_num_threads()} threads")
    print(f"sequential head (reference)     {1e3 * t_seq:9.1f} ms")
    print(f"upstream-style per-forward GS   {1e3 * t_up:9.1f} ms")
    print(f"folded low-rank (auto, 8T < D)  {1e3 * t_low:9.1f} ms   speed-up vs sequential {t_seq / t_low:5.2f}x, "
          f"vs upstream-style {t_up / t_low:5.2f}x")
    print(f"folded dense x L                {1e3 * t_dense:9.1f} ms   speed-up vs sequential {t_seq / t_dense:5.2f}x")
    print(f"max |folded - sequential|: low-rank {err['lowrank']:.2e}, dense {err['dense']:.2e}; "
          f"upstream-style {err['upstream-style']:.2e}")
    return {"B": B, "tokens": N, "D": D, "T": T, "sequential_ms": 1e3 * t_seq, "upstream_style_ms": 1e3 * t_up,
            "folded_lowrank_ms": 1e3 * t_low, "folded_dense_ms": 1e3 * t_dense,
            "lowrank_speedup_vs_sequential": t_seq / t_low, "lowrank_speedup_vs_upstream_style": t_up / t_low,
            "dense_speedup_vs_sequential": t_seq / t_dense, "max_err_lowrank": err["lowrank"],
            "max_err_dense": err["dense"], "max_err_upstream_style": err["upstream-style"]}


def part2(arch: str, size: int, batch: int, T: int, repeats: int) -> dict:
    import timm

    from dinokit.methods.rasa import RASATransform

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, dynamic_img_size=True).eval()
    model = model.to(DEVICE)
    D = model.embed_dim
    tr = RASATransform(RASAHead(D, stage_weights=torch.randn(T, 2, D) / D**0.5)).to(DEVICE)
    x = torch.randn(batch, 3, size, size).to(DEVICE)
    P = model.num_prefix_tokens
    with torch.no_grad():
        patch = model.forward_features(x)[:, P:]  # also the warm-up of the timing below
        t_bb = timeit(lambda: model.forward_features(x), repeats, warmup=0)
        t_head = timeit(lambda: tr(patch), max(5, repeats))
    print(f"== part 2: {arch} (random init, D={D}) at {size} px, batch {batch}, {patch.shape[1]} patch tokens, "
          f"T={T} stages ({tr.op.resolved_mode})")
    print(f"backbone forward_features       {1e3 * t_bb:9.1f} ms")
    print(f"RASA head on its patch tokens   {1e3 * t_head:9.3f} ms   "
          f"overhead {100 * t_head / t_bb:.3f}% of the forward")
    return {"arch": arch, "size": size, "batch": batch, "patch_tokens": int(patch.shape[1]),
            "backbone_forward_ms": 1e3 * t_bb, "head_ms": 1e3 * t_head, "head_overhead_pct": 100 * t_head / t_bb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller part 2 model (ViT-S/14) and fewer repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", default="vit_base_patch14_dinov2")
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--p1-batch", type=int, default=32, help="part 1: batch")
    ap.add_argument("--p1-tokens", type=int, default=1369, help="part 1: tokens per image (37x37)")
    ap.add_argument("--p1-dim", type=int, default=768, help="part 1: token width D")
    ap.add_argument("--stages", type=int, default=9, help="RASA stages T (both parts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    p1 = part1(args.p1_batch, args.p1_tokens, args.p1_dim, args.stages, args.repeats)
    arch = "vit_small_patch14_dinov2" if args.quick else args.arch
    p2 = part2(arch, args.size, args.batch, args.stages, 2)
    if args.json:
        write_figures(args.json, "bench_rasa", args, {"part1": p1, "part2": p2})


if __name__ == "__main__":
    main()
