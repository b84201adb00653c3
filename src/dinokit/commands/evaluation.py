"""Shared plumbing of the evaluation commands: open a split, featurise it (in memory or streamed, from shards or a
backbone), join the process group under torchrun, and write a result file whose printed keys the command declares.

The heavy lifting is in the library (``dinokit.data.sources.open_split``, ``dinokit.backbones.extract``,
``dinokit.eval.metrics``); these helpers wire it for ``dinokit eval ...`` and ``dinokit discover``. Imports stay
inside the functions so that ``dinokit --help`` does not load torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SEED_TOKEN_LIMIT = 10


@dataclass
class _Split:
    images: list  # uint8 (S, S, 3)
    masks: object  # torch (N, S, S) int64
    full_masks: list | None  # original-resolution masks (protocol full)
    ids: list[str]
    key: str
    num_classes: int
    ignore_index: int
    class_names: tuple[str, ...]


def _open_split(data: Path, split: str, size: int, n_images: int | None = None, keep_full: bool = False,
                indices: list[int] | None = None, need_masks: bool = True) -> _Split:
    import numpy as np
    import torch

    from ..data.datasets import open_dataset
    from ..data.transforms import SegTransform

    ds = open_dataset(Path(data), split)
    n = len(ds)
    if n == 0:
        raise ValueError(f"split {split!r} of {data} is empty; check --data and --split")
    idx = list(indices) if indices is not None else list(range(n if n_images is None else min(n, n_images)))
    tf = SegTransform(resize=(size, size))
    images, masks, full, ids = [], [], [], []
    for i in idx:
        item = ds[i]
        if need_masks and item.get("mask") is None:
            raise ValueError(f"{data} split {split!r} item {item['id']} has no mask; this evaluation needs labels")
        if keep_full:
            full.append(torch.from_numpy(np.asarray(item["mask"], np.int64)))
        t = tf(item)
        images.append(np.asarray(t["image"], np.uint8))
        if need_masks:
            masks.append(torch.from_numpy(t["mask"]))
        ids.append(str(item["id"]))
    return _Split(images, torch.stack(masks) if masks else None, full if keep_full else None, ids,
                  getattr(ds, "key", "dataset"), int(ds.num_classes), int(ds.ignore_index),
                  tuple(getattr(ds, "class_names", ())) or tuple(str(c) for c in range(ds.num_classes)))


def _backbone(backbone: str, weights: str, device: str):
    from ..backbones import load_backbone

    return load_backbone(backbone, weights, device=device).eval()


def _extract(bb, images: list, device: str, batch_size: int = 32):
    from ..backbones.extract import patch_features

    return patch_features(bb, images, batch_size, device)


def _record(bb) -> dict:
    """What a result records of the backbone that made its features."""
    return {"name": bb.name, "patch_size": bb.patch_size, "weights": bb.weights_info}


def _checked_record(fs, features: Path, size: int) -> dict:
    """The backbone record of feature shards ``fs`` (read from ``features``); refuses a grid ``size`` does not give."""
    rec = fs.meta.get("backbone", {})
    p = int(rec.get("patch_size") or 0)
    if p and tuple(fs.grid) != (size // p, size // p):
        raise ValueError(f"features in {features} have grid {tuple(fs.grid)}, but --size {size} with patch size {p} "
                         f"needs {(size // p, size // p)}; recompute them with `dinokit features --size {size}` or "
                         "fix --size")
    return rec


def _features(split: _Split, features: Path | None, backbone: str, weights: str, size: int, device: str,
              batch_size: int, bb=None):
    """(N, h, w, D) features of ``split``: from shards (checked) or extracted now. Returns (feats, record)."""
    if features is None:
        bb = bb or _backbone(backbone, weights, device)
        return _extract(bb, split.images, device, batch_size), _record(bb)
    from ..backbones.shards import load_feature_dir

    fs = load_feature_dir(features, expect_backbone=backbone)
    rec = _checked_record(fs, features, size)
    pos = {i: j for j, i in enumerate(fs.image_ids)}
    missing = [i for i in split.ids if i not in pos]
    if missing:
        raise ValueError(f"features in {features} lack {len(missing)} image(s) of the split (first: {missing[:3]}); "
                         "they were computed for another dataset or split")
    import torch

    return fs.patch[torch.tensor([pos[i] for i in split.ids])].float(), rec


def _meta(task: str, protocol: str, config: dict, record: dict, extra: dict | None = None) -> dict:
    from datetime import datetime, timezone

    from ..io import run_metadata, versions

    flat = {"meta/backbone": str(record.get("name")), "meta/weights": json.dumps(record.get("weights"), default=str),
            "meta/patch_size": str(record.get("patch_size")), "meta/feature_transform": str(config.get("rasa")),
            "meta/dinokit_version": versions().get("dinokit", "unknown"),
            "meta/created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    flat.update({f"meta/{k}": str(v) for k, v in (extra or {}).items()})
    flat["meta"] = run_metadata(config, protocol=f"{task}/{protocol}", weights=record.get("weights"))
    return flat


DEFAULT_SHOW = ("miou", "/r2", "/se", "corloc")


def write_result(out: Path, task: str, metrics: dict, meta: dict, show: tuple[str, ...] = DEFAULT_SHOW) -> Path | None:
    """Write ``<out>/<task>.json`` atomically (metrics + meta) and print the metrics whose key ends with one of
    ``show``. Under DDP only global rank 0 writes and prints (others return None)."""
    from ..eval.metrics import dist_rank_world
    from ..io import atomic_write_text

    if dist_rank_world()[0] != 0:
        return None
    path = Path(out) / f"{task}.json"
    atomic_write_text(path, json.dumps({**metrics, **meta}, indent=1, default=str, allow_nan=False))
    print(f"{task}: wrote {path}")
    for k, v in metrics.items():
        if k.endswith(tuple(show)):
            print(f"  {k} = {v:.4f}" if isinstance(v, float) else f"  {k} = {v}")
    return path


def _write(out: Path, task: str, metrics: dict, meta: dict) -> Path | None:
    return write_result(out, task, metrics, meta, show=DEFAULT_SHOW)


def _dist_setup(device: str) -> tuple[int, int, str]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); (rank, world, device)
    with ``cuda`` pinned to ``cuda:LOCAL_RANK``. The global rank decides sharding and who writes."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if str(device) == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return rank, world, device
    return 0, 1, device


def _workdir(out: Path, task: str):
    """A temporary folder under ``<out>/.tmp`` for disk-backed arrays (removed on exit, also on errors)."""
    import tempfile

    root = Path(out) / ".tmp"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f"{task}-", dir=root)


def subset_token(fraction: float, seed: int) -> str:
    """Key token of a seeded train subset: ``sub1of8-s42`` for 1/8 (a unit fraction), else ``sub0.3-s42``."""
    inv = 1.0 / fraction
    if abs(inv - round(inv)) < 1e-9 * inv and round(inv) > 1:
        return f"sub1of{round(inv)}-s{seed}"
    return f"sub{fraction:g}-s{seed}"


def _split_size(data: Path, split: str, n_images: int | None) -> int:
    from ..data.datasets import open_dataset

    n = len(open_dataset(Path(data), split))
    if n == 0:
        raise ValueError(f"split {split!r} of {data} is empty; check --data and --split")
    return n if n_images is None else min(n, n_images)


def stream_features(loader, features: Path | None, backbone: str, weights: str, size: int, device: str, bb=None):
    """(iterator of (patch (B, h, w, D) fp32, batch), backbone record): a batched forward over ``loader``, or the
    rows of ``--features DIR`` read lazily per batch (checked against the backbone, grid and split ids)."""
    from ..backbones.extract import iter_patch_features

    if features is None:
        bb = bb or _backbone(backbone, weights, device)
        return iter_patch_features(bb, loader, device), _record(bb)
    from ..backbones.shards import LazyFeatureDir

    fs = LazyFeatureDir(features, expect_backbone=backbone)
    rec = _checked_record(fs, features, size)
    missing = fs.missing(loader.dataset.ids)
    if missing:
        raise ValueError(f"features in {features} lack {len(missing)} image(s) of the split (first: {missing[:3]}); "
                         "they were computed for another dataset or split")
    return ((fs.patch_of(b["id"]), b) for b in loader), rec


def _figure_items(data: Path, split: str, size: int, n: int, mask_rule: str = "pixel_centre"):
    """uint8 (S, S, 3) images and (S, S) int64 masks of the first ``n`` items (for figures only)."""
    import numpy as np

    from ..data.datasets import open_dataset
    from ..data.sources import SegSplit

    sp = SegSplit(open_dataset(Path(data), split), size, None, list(range(n)), mask_rule=mask_rule)
    items = [sp[j] for j in range(min(n, len(sp)))]
    return ([it["image"].permute(1, 2, 0).numpy() for it in items],
            np.stack([it["mask"].long().numpy() for it in items]) if items else None)
