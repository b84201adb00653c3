"""Benchmark of the dense evaluation suite (dinokit vs the obvious baseline, measured in the same run).

1. Overclustering, PCA-50 + K=500 on N tokens of dim 384 (default 500,000; a Gaussian mixture of 300 centres):
   dinokit (exact streaming fp64 PCA + faiss k-means, faiss defaults: 256 points per centroid) vs scikit-learn
   (StandardScaler + PCA(50) + ``KMeans(n_init=1)``, k-means++ init, all points). Both k-means are capped at the
   same number of iterations (``--iters``, default 20) and one restart, so the ratio compares equal work budgets.
2. Hummingbird retrieval, queries/s: faiss ``IndexFlatIP`` vs brute-force torch (q @ Mᵀ + topk), exact, k = 30.
3. Peak memory of a Hummingbird evaluation: streaming confusion matrix (dinokit) vs storing every full-resolution
   prediction and label map and scoring at the end (open-hummingbird-eval), each in a fresh subprocess (VmHWM;
   random D=64 features and a 4-image memory keep the kNN cheap: what is measured is the prediction storage).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval.py`` (every library then runs single-threaded,
the fair setting on a shared machine; add ``--tokens 200000`` for a shorter run). ``--device cuda`` runs the two
torch kNN searches of section 2 on the GPU (and times faiss-gpu too when this faiss has GPUs); sections 1 and 3 are
host-side. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402


def _mixture(n: int, d: int, centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32) * 2.0
    x = c[rng.integers(0, centres, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def bench_overcluster(n: int, iters: int, k: int = 500) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from dinokit.eval.overcluster import kmeans, project_tokens

    x = _mixture(n, 384, 300)
    t = time.perf_counter()
    pts = project_tokens(torch.from_numpy(x).view(1, n, 1, 384), 50)
    t_pca = time.perf_counter() - t
    labels, _ = kmeans(pts, k, niter=iters, nredo=1, seed=0)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    z = PCA(50, random_state=0).fit_transform(StandardScaler().fit_transform(x))
    t_skpca = time.perf_counter() - t
    km = KMeans(k, n_init=1, max_iter=iters, random_state=0).fit(z)
    t_sk = time.perf_counter() - t
    inertia_ours = float(((pts.numpy() - _centroids(pts.numpy(), labels, k)) ** 2).sum())
    return {"tokens": n, "k": k, "iters": iters, "dinokit_s": t_ours, "dinokit_pca_s": t_pca, "sklearn_s": t_sk,
            "sklearn_pca_s": t_skpca, "speedup": t_sk / t_ours, "inertia_ratio_dinokit_over_sklearn":
            inertia_ours / float(km.inertia_), "sklearn_iters_run": int(km.n_iter_)}


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    cnt = np.bincount(labels, minlength=k)[:, None]
    return (sums / np.maximum(cnt, 1))[labels]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_knn(memory: int, queries: int, d: int = 384, k: int = 30, device: str = "cpu") -> dict:
    """faiss-cpu vs the two torch searches (on ``device``); faiss-gpu too on a GPU with a GPU faiss."""
    from dinokit.eval.hummingbird import knn_search, resolve_backend

    g = torch.Generator().manual_seed(0)
    mem = torch.nn.functional.normalize(torch.randn(memory, d, generator=g), dim=1)
    q = torch.randn(queries, d, generator=g)
    t = time.perf_counter()
    _, i_f = knn_search(q, mem, k, "faiss-cpu")
    t_f = time.perf_counter() - t
    qd, md = q.to(device), mem.to(device)
    if device.startswith("cuda"):  # warm-up: CUDA context, kernels
        torch.topk(qd[:64] @ md.T, k, dim=1)
        knn_search(qd[:64], md, k, "torch")
    _sync(device)
    t = time.perf_counter()
    out = []
    for s in range(0, queries, 4096):  # brute force: full score matrix per query block, then topk
        out.append(torch.topk(qd[s:s + 4096] @ md.T, k, dim=1).indices)
    i_t = torch.cat(out).cpu()
    t_t = time.perf_counter() - t
    t = time.perf_counter()
    _, i_c = knn_search(qd, md, k, "torch")
    i_c = i_c.cpu()
    t_c = time.perf_counter() - t
    res = {"memory": memory, "queries": queries, "device": device, "faiss_qps": queries / t_f,
           "torch_bruteforce_qps": queries / t_t, "dinokit_torch_chunked_qps": queries / t_c,
           "faiss_over_torch": t_t / t_f,
           "same_neighbour_sets": float(((i_f.sort(1).values == i_t.sort(1).values).all(1)).float().mean()),
           "same_as_dinokit_torch": float(((i_f.sort(1).values == i_c.sort(1).values).all(1)).float().mean())}
    if device.startswith("cuda") and resolve_backend("auto") == "faiss-gpu":
        knn_search(q[:64], mem, k, "faiss-gpu")
        t = time.perf_counter()
        _, i_g = knn_search(q, mem, k, "faiss-gpu")
        t_g = time.perf_counter() - t
        res.update({"faiss_gpu_qps": queries / t_g, "faiss_gpu_over_dinokit_torch": t_c / t_g,
                    "faiss_gpu_same_as_faiss_cpu": float(((i_f.sort(1).values == i_g.sort(1).values).all(1))
                                                         .float().mean())})
    return res


MEM_CHILD = r'''
import json, sys, torch
import torch.nn.functional as F
mode, n, size, grid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
from dinokit.eval.hummingbird import HummingbirdEvaluator, build_memory, soft_predict
from dinokit.eval.metrics import ConfusionMatrix, match_and_score
C, D, p = 21, 64, size // grid  # D only sets the kNN cost, not the memory of the predictions being measured
g = torch.Generator().manual_seed(0)
cells = torch.randint(0, C, (4, grid, grid), generator=g)
bank = build_memory(torch.randn(4, grid, grid, D, generator=g), cells.repeat_interleave(p, 1).repeat_interleave(p, 2),
                    C, memory_size=None)
def hwm():  # peak RSS of this process image in kB (VmHWM; ru_maxrss would include the parent's peak)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
base = hwm()
ev, cm, preds, gts = HummingbirdEvaluator(bank, C), ConfusionMatrix(C), [], []
for s in range(0, n, 16):  # batches arrive as from a data loader
    b = min(16, n - s)
    q = torch.randn(b, grid, grid, D, generator=g)
    gt = torch.randint(0, C, (b, size, size), generator=g)
    if mode == "stream":  # dinokit: streaming confusion matrix
        ev.update(q, gt)
    else:  # open-hummingbird-eval style: keep every full-resolution prediction and label map, score at the end
        y = soft_predict(q.reshape(-1, D), bank, 30).view(b, grid, grid, C).permute(0, 3, 1, 2)
        preds.append(F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False).argmax(1))
        gts.append(gt)
if mode == "store":
    cm.update(torch.cat(gts), torch.cat(preds))
else:
    cm = ev.cm
miou = match_and_score(cm.numpy(), "hungarian")["miou"]
peak = hwm()
print(json.dumps({"mode": mode, "peak_rss_mb": peak / 1024, "rss_before_eval_mb": base / 1024, "miou": miou}))
'''


def bench_memory(n: int, size: int, grid: int) -> dict:
    res = {}
    for mode in ("stream", "store"):
        out = subprocess.run([sys.executable, "-c", MEM_CHILD, mode, str(n), str(size), str(grid)], check=True,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    s, f = res["stream"], res["store"]
    return {"images": n, "size": size, "stream_peak_rss_mb": s["peak_rss_mb"], "store_peak_rss_mb": f["peak_rss_mb"],
            "stream_growth_mb": s["peak_rss_mb"] - s["rss_before_eval_mb"],
            "store_growth_mb": f["peak_rss_mb"] - f["rss_before_eval_mb"], "same_miou": s["miou"] == f["miou"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--memory", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--mem-images", type=int, default=200)
    ap.add_argument("--only-memory", action="store_true", help="run only the memory section")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--device", default="cpu", help="device of the torch kNN searches (section 2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.only_memory:
        m = bench_memory(args.mem_images, args.size, args.size // 14)
        print(json.dumps(m, indent=1))
        if args.json:
            write_figures(args.json, "bench_eval", args, {"memory": m})
        return
    r = bench_overcluster(args.tokens, args.iters)
    print(f"[overcluster] {r['tokens']} tokens x 384 -> PCA-50, K={r['k']}, {r['iters']} iterations, 1 restart: "
          f"dinokit {r['dinokit_s']:.1f} s (PCA {r['dinokit_pca_s']:.1f} s) vs sklearn {r['sklearn_s']:.1f} s "
          f"(PCA {r['sklearn_pca_s']:.1f} s) -> {r['speedup']:.1f}x; inertia dinokit/sklearn "
          f"{r['inertia_ratio_dinokit_over_sklearn']:.3f}")
    q = bench_knn(args.memory, args.queries, device=args.device)
    print(f"[hummingbird kNN] memory {q['memory']} x 384, {q['queries']} queries, k=30: faiss {q['faiss_qps']:.0f} q/s"
          f", torch matmul+topk {q['torch_bruteforce_qps']:.0f} q/s, dinokit torch chunked "
          f"{q['dinokit_torch_chunked_qps']:.0f} q/s -> faiss/torch {q['faiss_over_torch']:.2f}x; queries with "
          f"identical neighbour sets faiss vs torch: {q['same_neighbour_sets']:.4f}")
    if "faiss_gpu_qps" in q:
        print(f"[hummingbird kNN] faiss-gpu {q['faiss_gpu_qps']:.0f} q/s -> faiss-gpu/dinokit torch "
              f"{q['faiss_gpu_over_dinokit_torch']:.2f}x; same neighbour sets as faiss-cpu "
              f"{q['faiss_gpu_same_as_faiss_cpu']:.4f}")
    m = bench_memory(args.mem_images, args.size, args.size // 14)
    print(f"[hummingbird memory] {m['images']} val images at {m['size']}px: peak RSS streaming "
          f"{m['stream_peak_rss_mb']:.0f} MB (+{m['stream_growth_mb']:.0f} during eval) vs storing predictions "
          f"{m['store_peak_rss_mb']:.0f} MB (+{m['store_growth_mb']:.0f}) -> "
          f"{m['store_growth_mb'] / max(m['stream_growth_mb'], 1):.1f}x growth; same mIoU: {m['same_miou']}")
    figures = {"overcluster": r, "knn": q, "memory": m,
               "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(figures, indent=1))
    if args.json:
        write_figures(args.json, "bench_eval", args, figures)


if __name__ == "__main__":
    main()
