"""NeCo benchmarks, measured in one run.

Memory on CPU is the peak-RSS growth of a fresh subprocess run with ``MALLOC_MMAP_THRESHOLD_=131072`` (large blocks
are mmapped and returned on free, so RSS follows live tensors; without it glibc's heap reuse makes RSS noisy).

1. Soft sort, forward + backward of a random linear functional of (y, P), n = 49, 3136 rows (= 64 images x 49 query
   patches, one NeCo pair at batch 64), float32: ``diffsort.DiffSortNet`` (the reference) vs ``dinokit`` (strided
   two-column updates, analytic backward). Time = median of ``--repeats`` runs; peak memory = peak RSS growth of a
   fresh subprocess per method on CPU (``torch.cuda.max_memory_allocated`` on GPU).
   Then the NeCo loss over 10 pairs (what one step keeps alive until its single backward).
2. One NeCo training step split into teacher/student backbone forwards (+ heads), ROIAlign, sorting (teacher and
   student), loss and backward, with the dinokit sort and with diffsort in the loss.

Run: ``.venv/bin/python benchmarks/bench_neco.py`` (``--device cuda`` on a GPU machine; ``--json PATH`` also writes
the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _sorter(method: str, n: int, s: float, device: str):
    if method == "diffsort":
        from diffsort import DiffSortNet

        return DiffSortNet("bitonic", n, device=device, steepness=s)
    from dinokit.methods.neco.softsort import soft_sort

    if method == "dinokit-nockpt":  # no X checkpoints: only alpha and a - b saved per layer (the NeCo loss setting)
        return lambda x: soft_sort(x, s, "bitonic", segment=10 ** 9)
    return lambda x: soft_sort(x, s, "bitonic")


def sort_once(method: str, rows: int, n: int, s: float, device: str, seed: int = 0) -> float:
    """Seconds of one forward + backward."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, n, generator=g) * 2 - 1).to(device).requires_grad_()
    wy = torch.randn(rows, n, generator=g).to(device)
    wP = torch.randn(rows, n, n, generator=g).to(device)
    f = _sorter(method, n, s, device)
    _sync(device)
    t0 = time.perf_counter()
    y, P = f(x)
    ((y * wy).sum() + (P * wP).sum()).backward()
    _sync(device)
    return time.perf_counter() - t0


def _rss_mb() -> float:
    """Peak RSS (MB) of this process image: VmHWM (``ru_maxrss`` would include the parent's peak, which Linux
    carries across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(method: str, rows: int, n: int, s: float) -> None:
    """Child process: print the peak-RSS growth (MB) after the forward (what stays alive until the backward: saved
    tensors + outputs) and after forward + backward, on CPU."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sort_once(method, 8, n, s, "cpu")  # warm-up: imports, allocator, kernels
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, n, generator=g) * 2 - 1).requires_grad_()
    wy, wP = torch.randn(rows, n, generator=g), torch.randn(rows, n, n, generator=g)
    f = _sorter(method, n, s, "cpu")
    base = _rss_mb()
    y, P = f(x)
    fwd = _rss_mb() - base
    ((y * wy).sum() + (P * wP).sum()).backward()
    print(json.dumps({"peak_mb": _rss_mb() - base, "forward_mb": fwd}))


def loss_memory_worker(method: str, rows: int, n: int, s: float, pairs: int) -> None:
    """Child process: peak-RSS growth (MB) of the NeCo loss over ``pairs`` pairs (teacher sort under no_grad,
    student sort, cross-entropy), summed and back-propagated once, as in one training step."""
    from dinokit.methods.neco import sorting_cross_entropy

    f = _sorter(method, n, s, "cpu")
    sort_once(method, 8, n, s, "cpu")
    g = torch.Generator().manual_seed(0)
    dT = [torch.rand(rows, n, generator=g) * 2 - 1 for _ in range(pairs)]
    dS = [(d + 0.1 * torch.randn(rows, n, generator=g)).requires_grad_() for d in dT]
    base = _rss_mb()
    t0 = time.perf_counter()
    total = 0.0
    for a, b in zip(dT, dS):
        with torch.no_grad():
            _, Q = f(a)
        _, P = f(b)
        total = total + sorting_cross_entropy(Q, P)
    (total / pairs).backward()
    print(json.dumps({"peak_mb": _rss_mb() - base, "time_s": time.perf_counter() - t0}))


def _child(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # big blocks via mmap: RSS follows live memory
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory_mb(method: str, rows: int, n: int, s: float, device: str) -> dict[str, float]:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(rows, n, generator=g) * 2 - 1).to(device).requires_grad_()
        wy, wP = torch.randn(rows, n, generator=g).to(device), torch.randn(rows, n, n, generator=g).to(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y, P = _sorter(method, n, s, device)(x)
        fwd = (torch.cuda.memory_allocated() - base) / 2**20
        ((y * wy).sum() + (P * wP).sum()).backward()
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "forward_mb": fwd}
    return _child(["--memory-worker", method, "--rows", str(rows), "--n", str(n), "--steepness", str(s)])


def bench_sort(args) -> dict:
    """Timings interleaved (diffsort, dinokit, diffsort, ...) so that both see the same machine load."""
    methods = ("diffsort", "dinokit", "dinokit-nockpt")
    for m in methods:
        sort_once(m, 64, args.n, args.steepness, args.device)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.repeats):
        for m in methods:
            times[m].append(sort_once(m, args.rows, args.n, args.steepness, args.device, seed=i))
    res: dict = {}
    for m in methods:
        res[m] = {"time_s": statistics.median(times[m]), "times_s": [round(t, 3) for t in times[m]],
                  **peak_memory_mb(m, args.rows, args.n, args.steepness, args.device)}
    res["speedup"] = res["diffsort"]["time_s"] / res["dinokit"]["time_s"]
    res["pair_speedups"] = [round(a / b, 2) for a, b in zip(times["diffsort"], times["dinokit"])]
    res["memory_ratio"] = res["dinokit"]["peak_mb"] / max(res["diffsort"]["peak_mb"], 1e-9)
    res["forward_memory_ratio"] = res["dinokit"]["forward_mb"] / max(res["diffsort"]["forward_mb"], 1e-9)
    res["nockpt_speedup"] = res["diffsort"]["time_s"] / res["dinokit-nockpt"]["time_s"]
    res["nockpt_memory_ratio"] = res["dinokit-nockpt"]["peak_mb"] / max(res["diffsort"]["peak_mb"], 1e-9)
    res["nockpt_forward_memory_ratio"] = res["dinokit-nockpt"]["forward_mb"] / max(res["diffsort"]["forward_mb"],
                                                                                    1e-9)
    return res


def bench_step(args, sort_method: str) -> dict[str, float]:
    """One training step split into parts (seconds), the loss written out with the library's pieces."""
    from dinokit.backbones import load_backbone
    from dinokit.data.synthetic import SyntheticScenes
    from dinokit.methods.neco import (
        NeCo,
        NeCoConfig,
        NeCoDataset,
        NeCoViews,
        align,
        neco_collate,
        similarities,
        sorting_cross_entropy,
    )

    torch.manual_seed(0)
    dev = args.device
    student = load_backbone(args.backbone, weights="random", drop_path_rate=0.1, size_policy="crop")
    teacher = load_backbone(args.backbone, weights="random", size_policy="crop")
    cfg = NeCoConfig(roi_size=args.roi, head_hidden=args.head_hidden, head_dim=args.head_dim, queue_length=4096)
    neco = NeCo(student, teacher, cfg).to(dev).train()
    views = NeCoViews(sizes=(args.global_size, args.local_size))
    ds = NeCoDataset(SyntheticScenes(args.batch, (args.image_size, args.image_size), seed=0), views)
    batch = neco_collate([ds[i] for i in range(args.batch)])
    crops = [c.to(dev) for c in batch["crops"]]
    gc, all_ = batch["gc"].to(dev), batch["all"].to(dev)
    r, p, n = cfg.roi_size, neco.patch_size, cfg.roi_size ** 2
    B, K = args.batch, len(crops)
    sort = _sorter(sort_method, n, cfg.student_steepness, dev)
    parts: dict[str, float] = {k: 0.0 for k in ("teacher_forward", "student_forward", "queue", "roi_align",
                                                "similarities", "sort_teacher", "sort_student", "loss", "backward")}

    def timed(key, fn):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        parts[key] += time.perf_counter() - t0
        return out

    def step():
        with torch.no_grad():
            T = timed("teacher_forward", lambda: neco.encode(neco.teacher, neco.teacher_head, crops[:2]))
        Z = timed("student_forward", lambda: neco.encode(neco.student, neco.student_head, crops))

        def push():
            pend = {}
            for c in range(2):
                tok = T[c].permute(0, 2, 3, 1).reshape(-1, T[c].shape[1])
                pend[c] = neco.queues[c].pushed(tok[torch.randperm(tok.shape[0])[:10 * B]])
            return pend

        pending = timed("queue", push)
        total = 0.0
        for c in range(2):
            for v in range(K):
                if v == c:
                    continue
                t_al, s_al = timed("roi_align", lambda c=c, v=v: (align(T[c], gc[:, c, v], p, r),
                                                                  align(Z[v], all_[:, v, c], p, r)))
                R = neco.draw_references(c, B, n, pending, t_al)
                dT, dS = timed("similarities", lambda t=t_al, s=s_al, R=R: (
                    similarities(t.flatten(2).transpose(1, 2), R).reshape(-1, n),
                    similarities(s.flatten(2).transpose(1, 2), R).reshape(-1, n)))
                with torch.no_grad():
                    _, Q = timed("sort_teacher", lambda d=dT: sort(d))
                _, P = timed("sort_student", lambda d=dS: sort(d))
                total = total + timed("loss", lambda Q=Q, P=P: sorting_cross_entropy(Q, P))
        loss = total / (2 * (K - 1))
        timed("backward", loss.backward)
        neco.zero_grad(set_to_none=True)

    for _ in range(args.step_repeats):
        step()
    parts = {k: v / args.step_repeats for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=3136)
    ap.add_argument("--n", type=int, default=49)
    ap.add_argument("--steepness", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="demo_vit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--global-size", type=int, default=64)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--roi", type=int, default=7)
    ap.add_argument("--head-hidden", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--step-repeats", type=int, default=1)
    ap.add_argument("--step-compare", action="store_true", help="also time the step with diffsort in the loss")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--pairs", type=int, default=10, help="pairs in the loss-memory measurement (0: skip)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--loss-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.rows, args.n, args.steepness)
        return
    if args.loss_worker:
        loss_memory_worker(args.loss_worker, args.rows, args.n, args.steepness, args.pairs)
        return
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    res = bench_sort(args)
    figures: dict = {"sort": res}
    print(f"\nsoft sort fwd+bwd, bitonic, n={args.n}, rows={args.rows}, s={args.steepness}, float32")
    print(f"{'method':<16}{'median s':>10}{'runs':>24}{'peak MB':>10}{'after fwd MB':>14}")
    for m in ("diffsort", "dinokit", "dinokit-nockpt"):
        print(f"{m:<16}{res[m]['time_s']:>10.3f}{str(res[m]['times_s']):>24}{res[m]['peak_mb']:>10.1f}"
              f"{res[m]['forward_mb']:>14.1f}")
    print(f"speedup (diffsort / dinokit median time): {res['speedup']:.2f}x, per interleaved pair "
          f"{res['pair_speedups']} (goal >= 1.5x)")
    print(f"memory ratio (dinokit / diffsort), fwd+bwd peak: {res['memory_ratio']:.3f} (goal <= 0.2); kept after "
          f"the forward (saved for backward + outputs): {res['forward_memory_ratio']:.3f}")
    print(f"dinokit-nockpt (the loss setting): speedup {res['nockpt_speedup']:.2f}x, peak ratio "
          f"{res['nockpt_memory_ratio']:.3f}, kept-after-forward ratio {res['nockpt_forward_memory_ratio']:.3f}")
    if args.pairs and not args.device.startswith("cuda"):
        print(f"\nNeCo loss over {args.pairs} pairs ({args.rows} rows each = 64 images x 49 queries), one backward:")
        lm = {m: _child(["--loss-worker", m, "--rows", str(args.rows), "--n", str(args.n), "--steepness",
                         str(args.steepness), "--pairs", str(args.pairs)]) for m in ("diffsort", "dinokit-nockpt")}
        for m, v in lm.items():
            print(f"{m:<16} peak {v['peak_mb']:>9.1f} MB  time {v['time_s']:>8.2f} s")
        ratio = lm["dinokit-nockpt"]["peak_mb"] / lm["diffsort"]["peak_mb"]
        print(f"loss memory ratio (dinokit / diffsort): {ratio:.3f}"
              f" (goal <= 0.2); time ratio {lm['diffsort']['time_s'] / lm['dinokit-nockpt']['time_s']:.2f}x")
        figures["loss_memory"] = {**lm, "memory_ratio": ratio}
    if args.skip_step:
        if args.json:
            write_figures(args.json, "bench_neco", args, figures)
        return
    print(f"\none training step: {args.backbone} (random init), B={args.batch}, crops 2x{args.global_size} + "
          f"4x{args.local_size} px, r={args.roi} (n={args.roi ** 2}), head {args.head_hidden}->{args.head_dim}, "
          f"mean of {args.step_repeats}")
    methods = ("dinokit", "diffsort") if args.step_compare else ("dinokit",)
    steps = {m: bench_step(args, m) for m in methods}
    print(f"{'part':<18}" + "".join(f"{m + ' s':>12}{'share':>8}" for m in methods))
    for k in steps["dinokit"]:
        print(f"{k:<18}" + "".join(f"{steps[m][k]:>12.4f}{steps[m][k] / steps[m]['total']:>8.1%}" for m in methods))
    figures["step"] = steps
    if args.step_compare:
        print(f"step speedup from the sort (diffsort / dinokit total): "
              f"{steps['diffsort']['total'] / steps['dinokit']['total']:.2f}x")
        figures["step_speedup_from_sort"] = steps["diffsort"]["total"] / steps["dinokit"]["total"]
    if args.json:
        write_figures(args.json, "bench_neco", args, figures)


if __name__ == "__main__":
    main()
