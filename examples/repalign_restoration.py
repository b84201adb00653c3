"""Denoising with RepAlign: a tiny residual CNN trained with L1 and with L1 + 0.1 * RepAlign on synthetic scenes.

The teacher is a small ViT (``demo_vit`` by default: patch 8, 4 blocks, D 96). Without a trained checkpoint it is
RANDOMLY INITIALISED (no weights can be downloaded here), so the numbers show the mechanics, not what a pretrained
DINO teacher gives; pass ``--teacher-weights path`` (e.g. a checkpoint written by dinokit) for a trained one.

    .venv/bin/python examples/repalign_restoration.py --steps 300 --out runs/repalign_example

Prints a table (PSNR and teacher-feature cosine on held-out noisy images) and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dinokit.backbones import load_backbone
from dinokit.data.synthetic import SyntheticScenes
from dinokit.demo.repalign import format_table, run_restoration, scene_tensors
from dinokit.io import atomic_write_text, run_metadata


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="demo_vit", help="dinokit backbone name of the teacher")
    p.add_argument("--teacher-weights", default="random", help="'random' or a checkpoint path")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="square scene side (a multiple of the patch size)")
    p.add_argument("--sigma", type=float, default=0.1, help="Gaussian noise std on [0, 1] images")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight", type=float, default=0.1, help="weight of the RepAlign term")
    p.add_argument("--mode", default="group", choices=["group", "whole"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for these tiny tensors on a shared host)")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json (optional)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.teacher, weights=args.teacher_weights)
    if args.size % bb.patch_size:
        p.error(f"--size {args.size} is not a multiple of the teacher's patch size {bb.patch_size}")
    train = scene_tensors(SyntheticScenes(args.n_train, (args.size, args.size), seed=args.seed * 10))
    test = scene_tensors(SyntheticScenes(args.n_test, (args.size, args.size), seed=args.seed * 10 + 2))
    rows = run_restoration(bb.model, bb.mean, bb.std, train, test, sigma=args.sigma, steps=args.steps,
                           batch=args.batch, lr=args.lr, weight=args.weight, seed=args.seed,
                           repalign_kwargs={"mode": args.mode})
    source = bb.weights_info.get("source", "?")
    print(f"teacher {args.teacher} ({'RANDOM init' if source == 'random' else args.teacher_weights}), "
          f"{args.n_train} train / {args.n_test} held-out synthetic scenes of {args.size}^2, sigma {args.sigma}, "
          f"{args.steps} steps, batch {args.batch}, seed {args.seed}")
    print(format_table(rows))
    if args.out is not None:
        flat = {f"repalign_example/{name}/{k}": v for name, r in rows.items() for k, v in vars(r).items()}
        meta = run_metadata(vars(args) | {"out": str(args.out)}, "repalign_restoration", bb.weights_info)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "results.json", json.dumps({**flat, "meta": meta}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
