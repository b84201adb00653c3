"""Throughput of the ``dinokit features`` pipeline vs a bare timm forward (same model, batch, input size).

The pipeline includes decoding PNG files, resizing, normalising on the device, the forward, splitting
CLS/registers/patches and writing safetensors shards. The baseline is ``model.forward_features`` on tensors
already in memory: the practical limit of any feature pipeline. Goal: ratio >= 0.9.

    .venv/bin/python benchmarks/bench_features.py [--n 128] [--batch 32] [--model dino_vits16] [--size 224]
        [--device cuda] [--json figures.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.backbones import load_backbone
from dinokit.backbones.extract import extract_features
from dinokit.data.sources import ImageInput
from dinokit.data.synthetic import render_scene

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_figures  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="dino_vits16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device of the backbone (both measurements)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    bb = load_backbone(args.model, weights="random", device=dev).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for i in range(args.n):
            Image.fromarray(render_scene(0, i, (args.size, args.size)).image).save(root / f"{i:05d}.png")
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        with torch.no_grad():
            bb.model.forward_features(x)  # warm-up
        bare, pipe = [], []
        for r in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(0, args.n, args.batch):
                    bb.model.forward_features(x)
            _sync(dev)
            bare.append(args.n / (time.perf_counter() - t0))
            out = Path(tmp) / f"feats{r}"
            t0 = time.perf_counter()
            extract_features(bb, ImageInput(root, (args.size, args.size)), out, batch_size=args.batch,
                             shard_size=args.n, num_workers=args.workers, progress=False)
            pipe.append(args.n / (time.perf_counter() - t0))
    b, p = float(np.median(bare)), float(np.median(pipe))
    print(f"model {args.model} (random init), {args.n} images {args.size}x{args.size}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.workers} decode worker(s)")
    print(f"bare timm forward_features : {b:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"dinokit features pipeline  : {p:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in pipe)})")
    print(f"ratio pipeline / bare      : {p / b:8.3f}  (goal >= 0.9)")
    if args.json:
        write_figures(args.json, "bench_features", args, {"bare_images_per_s": b, "pipeline_images_per_s": p,
                                                           "ratio_pipeline_over_bare": p / b, "bare_runs": bare,
                                                           "pipeline_runs": pipe})


if __name__ == "__main__":
    main()
