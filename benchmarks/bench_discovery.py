"""Benchmark of single-object discovery: dinokit's batched LOST and TokenCut vs a batch-1 numpy/scipy baseline of the
same algorithms (the reference's way: one image at a time, ``scipy.linalg.eigh(D - W, D)`` on the CPU), in one run.

Inputs are ViT-S/16-sized key grids (30 x 30 = 900 tokens, D = 384): a background direction plus one planted object
block per image (random position and size) plus noise, so both implementations have a meaningful box to find; the
run also reports how often the two agree on the box and their CorLoc against the planted block (equal CorLoc is the
acceptance condition, speed is the goal). Times are ms per image after one warm-up batch, the keys already on the
device (the backbone forward is the same for both and not timed).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_discovery.py --n 32 --batch 16`` (CPU), or
``--device cuda`` on a GPU machine. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import ndimage
from scipy.linalg import eigh

H = W = 30
D = 384
P = 16


def planted_keys(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W, D) fp32 keys and (n, 4) planted grid extents (r0, r1, c0, c1)."""
    rng = np.random.default_rng(seed)
    bg = rng.standard_normal(D).astype(np.float32)
    keys = np.empty((n, H, W, D), np.float32)
    ext = np.zeros((n, 4), np.int64)
    for i in range(n):
        obj = rng.standard_normal(D).astype(np.float32) - 0.5 * bg
        h, w = rng.integers(6, 16, 2)
        r, c = rng.integers(0, H - h), rng.integers(0, W - w)
        keys[i] = bg
        keys[i, r:r + h, c:c + w] = obj
        keys[i] += 0.8 * rng.standard_normal((H, W, D)).astype(np.float32)
        ext[i] = (r, r + h, c, c + w)
    return keys, ext


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def lost_scipy(f: np.ndarray, k: int = 100) -> tuple[int, int, int, int]:
    """One image, the reference's LOST: (H*W, D) keys -> grid extent."""
    A = f @ f.T
    A0 = A.copy()
    np.fill_diagonal(A0, 0)
    A0[A0 < 0] = 0
    order = np.argsort((A0 > 0).sum(1), kind="stable")
    seed = order[0]
    pot = order[:k]
    sim = pot[A[seed, pot] > 0]
    M = A[sim].sum(0).reshape(H, W)
    lab, _ = ndimage.label(M > 0)
    return _extent(lab == lab.reshape(-1)[seed])


def tokencut_scipy(f: np.ndarray, tau: float = 0.2, eps: float = 1e-5) -> tuple[int, int, int, int]:
    """One image, the reference's TokenCut: (H*W, D) keys -> grid extent."""
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    A = fn @ fn.T
    Wg = np.where(A > tau, 1.0, eps)
    d = Wg.sum(1)
    _, vec = eigh(np.diag(d) - Wg, np.diag(d), subset_by_index=[1, 2])
    x = vec[:, 0]
    part = x > x.mean()
    seed = int(np.argmax(np.abs(x)))
    if not part[seed]:
        part = ~part
    lab, _ = ndimage.label(part.reshape(H, W))
    return _extent(lab == lab.reshape(-1)[seed])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(method: str, keys: np.ndarray, ext: np.ndarray, device: torch.device, batch: int,
          eig_dtype: torch.dtype) -> dict:
    from dinokit.eval.discovery import lost, tokencut

    n = len(keys)
    base_fn = lost_scipy if method == "lost" else tokencut_scipy
    ours_fn = (lambda k: lost(k)) if method == "lost" else (lambda k: tokencut(k, eig_dtype=eig_dtype))
    kt = torch.from_numpy(keys).to(device)
    ours_fn(kt[:batch])  # warm-up (kernels, cuSOLVER handles)
    _sync(device)
    t = time.perf_counter()
    mine = []
    for s in range(0, n, batch):
        mine.append(ours_fn(kt[s:s + batch]).extent.cpu())
    _sync(device)
    t_ours = (time.perf_counter() - t) / n
    base_fn(keys[0].reshape(-1, D))
    t = time.perf_counter()
    ref = [base_fn(keys[i].reshape(-1, D)) for i in range(n)]
    t_base = (time.perf_counter() - t) / n
    mine = torch.cat(mine).numpy()
    ref = np.asarray(ref)

    def corloc(e: np.ndarray) -> float:
        a = np.maximum(0, np.minimum(e[:, 1], ext[:, 1]) - np.maximum(e[:, 0], ext[:, 0])) * \
            np.maximum(0, np.minimum(e[:, 3], ext[:, 3]) - np.maximum(e[:, 2], ext[:, 2]))
        area = lambda x: (x[:, 1] - x[:, 0]) * (x[:, 3] - x[:, 2])  # noqa: E731
        return float(np.mean(a / (area(e) + area(ext) - a) >= 0.5))

    return {"method": method, "ms_per_image_dinokit": 1e3 * t_ours, "ms_per_image_scipy": 1e3 * t_base,
            "speedup": t_base / t_ours, "box_agreement": float(np.mean((mine == ref).all(1))),
            "corloc_dinokit": corloc(mine), "corloc_scipy": corloc(ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=32, help="images")
    ap.add_argument("--batch", type=int, default=16, help="images per dinokit batch")
    ap.add_argument("--eig_dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    keys, ext = planted_keys(args.n)
    rows = [bench(m, keys, ext, device, args.batch, getattr(torch, args.eig_dtype)) for m in ("lost", "tokencut")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.n} images of {H}x{W} tokens, D={D}; dinokit batch {args.batch}, "
          f"TokenCut eigh in {args.eig_dtype}")
    print(f"{'method':10s} {'dinokit ms/img':>15s} {'scipy ms/img':>13s} {'ratio':>7s} {'same box':>9s} "
          f"{'CorLoc ours/ref':>16s}")
    for r in rows:
        print(f"{r['method']:10s} {r['ms_per_image_dinokit']:15.2f} {r['ms_per_image_scipy']:13.2f} "
              f"{r['speedup']:7.2f} {r['box_agreement']:9.2f} {r['corloc_dinokit']:7.2f} / {r['corloc_scipy']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "n": args.n, "batch": args.batch, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
