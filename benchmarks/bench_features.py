"""Throughput of the ``dinokit features`` pipeline vs a bare timm forward (same model, batch, input size).

The pipeline includes decoding PNG files, resizing, normalising on the device, the forward, splitting
CLS/registers/patches and writing safetensors shards. The baseline is ``model.forward_features`` on tensors
already in memory: the practical limit of any feature pipeline. Goal: ratio >= 0.9.

    .venv/bin/python benchmarks/bench_features.py [--n 128] [--batch 32] [--model dino_vits16] [--size 224]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="dino_vits16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.model, weights="random").eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for i in range(args.n):
            Image.fromarray(render_scene(0, i, (args.size, args.size)).image).save(root / f"{i:05d}.png")
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.no_grad():
            bb.model.forward_features(x)  # warm-up
        bare, pipe = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(0, args.n, args.batch):
                    bb.model.forward_features(x)
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


if __name__ == "__main__":
    main()
