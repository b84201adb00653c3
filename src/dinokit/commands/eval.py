"""``dinokit eval {overcluster,linear,hummingbird,position,entropy,boxes}``: dataset -> features -> JSON + figures.

Each command opens a dataset with :func:`dinokit.data.datasets.open_dataset`, squashes images to ``size`` x ``size``
(antialiased bilinear; masks nearest at pixel centres), extracts patch features with the backbone (or reads feature
shards written by ``dinokit features`` with ``--features DIR``, checked against the configured backbone and grid),
runs the evaluator and writes ``<out>/<task>.json`` (flat keys per spec §9 plus ``meta/*`` strings and a ``meta``
provenance block, atomically) and figures under ``<out>/figures``. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import command, group

group("eval", "Dense evaluation protocols: overclustering, linear probe, Hummingbird, position, entropy, boxes")


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


def _features(split: _Split, features: Path | None, backbone: str, weights: str, size: int, device: str,
              batch_size: int, bb=None):
    """(N, h, w, D) features of ``split``: from shards (checked) or extracted now. Returns (feats, record)."""
    if features is None:
        bb = bb or _backbone(backbone, weights, device)
        return _extract(bb, split.images, device, batch_size), {"name": bb.name, "patch_size": bb.patch_size,
                                                              "weights": bb.weights_info}
    from ..backbones.shards import load_feature_dir

    fs = load_feature_dir(features, expect_backbone=backbone)
    rec = fs.meta.get("backbone", {})
    p = int(rec.get("patch_size") or 0)
    if p and tuple(fs.grid) != (size // p, size // p):
        raise ValueError(f"features in {features} have grid {tuple(fs.grid)}, but --size {size} with patch size {p} "
                         f"needs {(size // p, size // p)}; recompute them with `dinokit features --size {size}` or "
                         "fix --size")
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


def _write(out: Path, task: str, metrics: dict, meta: dict) -> Path:
    from ..io import atomic_write_text

    path = Path(out) / f"{task}.json"
    atomic_write_text(path, json.dumps({**metrics, **meta}, indent=1, default=str))
    print(f"{task}: wrote {path}")
    for k, v in metrics.items():
        if k.endswith("miou") or k.endswith("/r2") or k.endswith("/se") or k.endswith("corloc"):
            print(f"  {k} = {v:.4f}" if isinstance(v, float) else f"  {k} = {v}")
    return path


@command("eval overcluster")
def overcluster(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14",
                weights: str = "pretrained", split: str = "val", size: int = 448, protocol: str = "fast100",
                ks: list[int] | None = None, seeds: list[int] | None = None, niter: int = 100, nredo: int = 5,
                kmeans_backend: str = "faiss", n_images: int | None = None, features: Path | None = None,
                batch_size: int = 32, device: str = "cpu", n_figures: int = 4, seed: int = 0) -> int:
    """Overclustering (k-means segmentation) mIoU of the evaluation split (spec §3).

    Args:
        data: dataset root (VOC-style, COCO, ADE20K, Cityscapes layouts).
        out: output folder (overcluster.json, figures/).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        split: evaluation split.
        size: squash size S (448 in fast100).
        protocol: fast100 (100x100 maps) or full (token map resized to each original mask).
        ks: list of K (default [C, 100, 300, 500], capped at the number of tokens).
        seeds: k-means seeds (default 0..4; mean and std reported).
        niter: k-means iterations.
        nredo: k-means restarts (best objective kept).
        kmeans_backend: faiss or torch.
        n_images: only the first n images (e.g. 1440 reproduces upstream's drop_last).
        features: read features written by `dinokit features` instead of recomputing them.
        batch_size: images per forward pass.
        device: torch device.
        n_figures: images drawn in the cluster-map figure.
        seed: recorded seed (k-means seeds are given by seeds).
    """
    from ..eval.overcluster import overcluster as run
    from ..viz.figures import save_confusion, save_label_grid

    t0 = time.perf_counter()
    seeds = list(seeds) if seeds is not None else [0, 1, 2, 3, 4]
    sp = _open_split(data, split, size, n_images, keep_full=protocol == "full")
    feats, rec = _features(sp, features, backbone, weights, size, device, batch_size)
    res = run(feats, sp.full_masks if protocol == "full" else sp.masks, sp.num_classes, ks=ks, seeds=seeds,
              protocol=protocol, ignore_index=sp.ignore_index, niter=niter, nredo=nredo, backend=kmeans_backend)
    base = f"{sp.key}/overcluster/{protocol}/in{size}"
    metrics = {f"{base}/{k}": v for k, v in res.metrics.items()}
    figs = Path(out) / "figures"
    n = min(n_figures, len(sp.images))
    if n:
        save_label_grid(figs / "overcluster_maps.png", sp.images[:n],
                        {"ground truth": sp.masks[:n].numpy(),
                         **{f"k{k} clusters": m[:n] for k, m in res.cluster_maps.items()}}, sp.ignore_index)
    k0 = sp.num_classes if sp.num_classes in res.confusion else next(iter(res.confusion))
    save_confusion(figs / "overcluster_confusion.png", res.confusion[k0], sp.class_names,
                   title=f"K={k0} clusters (seed {seeds[0]}) vs ground truth")
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "split": split, "size": size,
           "protocol": protocol, "ks": ks, "seeds": seeds, "niter": niter, "nredo": nredo, "n_images": n_images,
           "features": str(features) if features else None, "seed": seed, "seconds": time.perf_counter() - t0}
    _write(out, "overcluster", metrics, _meta("overcluster", protocol, cfg, rec,
                                              {"kmeans_backend": kmeans_backend, "seeds": seeds}))
    return 0


@command("eval linear")
def linear(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14", weights: str = "pretrained",
           train_split: str = "train", split: str = "val", size: int = 448, protocol: str = "fast100",
           lrs: list[float] | None = None, epochs: int = 25, iterations: int = 40_000, batch_size: int | None = None,
           eval_size: int | None = 100, train_fraction: float | None = None, subset_seed: int = 400,
           n_images: int | None = None, features: Path | None = None, train_features: Path | None = None,
           device: str = "cpu", seed: int = 400) -> int:
    """Linear segmentation probe on frozen features, several learning rates in one pass (spec §4).

    Args:
        data: dataset root.
        out: output folder (linear.json, figures/).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        train_split: split the heads are trained on (VOC: trainaug).
        split: evaluation split.
        size: squash size S of train and val images.
        protocol: fast100 (SGD, StepLR, 100x100 logits) or full (BN head, AdamW, warm-up + cosine, labels at
            original size).
        lrs: learning rates trained together (default: the protocol's lr); the best on val is reported as miou.
        epochs: training epochs (fast100).
        iterations: training iterations (full).
        batch_size: images per step (default 128 fast100, 16 full).
        eval_size: fast100 logits/label side (100); null evaluates at S (the fast100@S variant).
        train_fraction: seeded fraction of the train split (COCO: 0.1).
        subset_seed: seed of the train subset.
        n_images: only the first n val images.
        features: val features written by `dinokit features`.
        train_features: train features written by `dinokit features`.
        device: torch device.
        seed: probe seed (head init, shuffling).
    """
    from ..eval.hummingbird import select_subset
    from ..eval.linear_seg import linear_probe, lr_token
    from ..viz.figures import save_confusion, save_curves

    t0 = time.perf_counter()
    from ..data.datasets import open_dataset

    n_train = len(open_dataset(Path(data), train_split))
    sub = select_subset(n_train, train_fraction, subset_seed)
    tr = _open_split(data, train_split, size, indices=sub)
    va = _open_split(data, split, size, n_images, keep_full=protocol == "full")
    bb = None if features and train_features else _backbone(backbone, weights, device)
    tf, rec = _features(tr, train_features, backbone, weights, size, device, 32, bb)
    vf, _ = _features(va, features, backbone, weights, size, device, 32, bb)
    res = linear_probe(tf, tr.masks, vf, va.full_masks if protocol == "full" else va.masks, va.num_classes,
                       protocol=protocol, lrs=lrs, epochs=epochs, iterations=iterations, batch_size=batch_size,
                       eval_size=eval_size if protocol == "fast100" else None, ignore_index=va.ignore_index,
                       seed=seed, device=device, class_names=va.class_names)
    name = protocol if protocol == "full" or eval_size is not None else f"{protocol}@{size}"
    sub_tok = f"/sub{train_fraction:g}-s{subset_seed}" if train_fraction else ""
    base = f"{va.key}/linear/{name}{sub_tok}/in{size}"
    metrics = {f"{base}/{k}": v for k, v in res.metrics.items()}
    figs = Path(out) / "figures"
    save_confusion(figs / "linear_confusion.png", res.confusion, va.class_names,
                   title=f"linear probe ({lr_token(res.metrics['best_lr'])}), {va.key} {split}")
    save_curves(figs / "linear_curves.png", {k: v["val_miou"] for k, v in res.curves.items()}, ylabel="val mIoU",
                title="linear probe, one head per learning rate")
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "train_split": train_split, "split": split,
           "size": size, "protocol": protocol, "lrs": lrs, "epochs": epochs, "iterations": iterations,
           "batch_size": batch_size, "eval_size": eval_size, "train_fraction": train_fraction, "seed": seed,
           "seconds": time.perf_counter() - t0}
    _write(out, "linear", metrics, _meta("linear", protocol, cfg, rec,
                                         {"seeds": [seed], "selection": "best_val (validation = evaluation split)"}))
    return 0


def augment_memory_view(image, mask, size: int, seed: int):
    """One Hummingbird memory view (spec §5.1): colour jitter (brightness, contrast, saturation, hue 0.1, each
    with p 0.5), then a paired RandomResizedCrop to ``size`` (scale (0.5, 2.0), ratio (3/4, 4/3); bilinear +
    antialias image, nearest mask). ``image`` PIL RGB, ``mask`` (H, W) int64 -> (uint8 (S, S, 3), (S, S) int64)."""
    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    g = torch.Generator().manual_seed(seed)
    x = TF.to_image(image)
    for fn, lo_hi in ((TF.adjust_brightness, (0.9, 1.1)), (TF.adjust_contrast, (0.9, 1.1)),
                      (TF.adjust_saturation, (0.9, 1.1)), (TF.adjust_hue, (-0.1, 0.1))):
        if float(torch.rand((), generator=g)) < 0.5:
            f = lo_hi[0] + (lo_hi[1] - lo_hi[0]) * float(torch.rand((), generator=g))
            x = fn(x, f)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = RandomResizedCrop.get_params(x, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3))
    img = TF.resized_crop(x, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    m = TF.resized_crop(torch.as_tensor(np.asarray(mask))[None], top, left, h, w, [size, size],
                        InterpolationMode.NEAREST)[0]
    return img.permute(1, 2, 0).numpy().astype(np.uint8), m.long()


@command("eval hummingbird")
def hummingbird(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14",
                weights: str = "pretrained", train_split: str = "train", split: str = "val", size: int = 504,
                memory_size: int | None = 102_400, epochs: int = 2, k: int = 30, beta: float = 0.02,
                knn_backend: str = "auto", matching: str = "hungarian", augment: bool = True,
                train_fraction: float | None = None, subset_seed: int = 0, mem_fp16: bool = False,
                n_images: int | None = None, features: Path | None = None, batch_size: int = 32,
                device: str = "cpu", n_figures: int = 4, seed: int = 0) -> int:
    """Hummingbird dense nearest-neighbour retrieval, protocol hb2 (spec §5).

    Args:
        data: dataset root.
        out: output folder (hummingbird.json, figures/).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        train_split: memory split (VOC: trainaug).
        split: query / evaluation split.
        size: squash size S (504 for p14, 512 for p16).
        memory_size: memory rows M (null = all cells).
        epochs: augmented passes E over the train split.
        k: neighbours.
        beta: softmax temperature.
        knn_backend: auto, faiss-cpu, faiss-gpu, torch, or ivf<nlist>-p<nprobe>.
        matching: hungarian (upstream) or none.
        augment: colour jitter + RandomResizedCrop memory views (false: plain squashed images, one pass).
        train_fraction: seeded fraction of the train split (e.g. 0.125).
        subset_seed: seed of the train subset.
        mem_fp16: store the memory features in fp16.
        n_images: only the first n val images.
        features: val features written by `dinokit features` (the memory is always computed: it is augmented).
        batch_size: images per forward pass.
        device: torch device.
        n_figures: val images drawn in the prediction figure.
        seed: seed of the augmentations and the memory sampling.
    """
    import torch

    from ..data.datasets import open_dataset
    from ..eval.hummingbird import hummingbird as run
    from ..eval.hummingbird import resolve_backend, select_subset
    from ..viz.figures import save_confusion, save_label_grid

    t0 = time.perf_counter()
    ds = open_dataset(Path(data), train_split)
    if len(ds) == 0:
        raise ValueError(f"train split {train_split!r} of {data} is empty")
    sub = select_subset(len(ds), train_fraction, subset_seed)
    bb = _backbone(backbone, weights, device)
    passes = epochs if augment else 1
    import numpy as np

    from ..data.transforms import SegTransform
    from ..eval.hummingbird import MemoryBuilder

    order = [(e, i) for e in range(passes) for i in sub]
    builder = MemoryBuilder(ds.num_classes, len(order), memory_size, seed, ds.ignore_index, 0,
                            torch.float16 if mem_fp16 else torch.float32)
    for s in range(0, len(order), batch_size):  # stream: augment, extract and sample one batch at a time
        views, vmasks = [], []
        for e, i in order[s:s + batch_size]:
            item = ds[i]
            if augment:
                img, m = augment_memory_view(item["image"], item["mask"], size, seed * 1_000_003 + e * len(ds) + i)
            else:
                t = SegTransform(resize=(size, size))(item)
                img, m = np.asarray(t["image"], np.uint8), torch.from_numpy(t["mask"])
            views.append(img)
            vmasks.append(m)
        builder.add(_extract(bb, views, device, batch_size), torch.stack(vmasks), list(range(s, s + len(views))))
    memory = builder.build()
    va = _open_split(data, split, size, n_images)
    vf, rec = _features(va, features, backbone, weights, size, device, batch_size, bb)
    res = run(memory, None, vf, va.masks, va.num_classes, k=k, beta=beta, memory_size=memory_size,
              backend=knn_backend, matching=matching, ignore_index=va.ignore_index,
              memory_ignore_to=0, seed=seed, mem_dtype=torch.float16 if mem_fp16 else torch.float32,
              n_examples=n_figures, class_names=va.class_names)
    backend = resolve_backend(knn_backend)
    nn_tok = backend if backend.startswith("ivf") else "exact"
    sub_tok = f"/sub{train_fraction:g}-s{subset_seed}" if train_fraction else ""
    mem_tok = f"mem{memory_size}" if memory_size is not None else "memall"
    base = (f"{va.key}/hummingbird/hb2{sub_tok}/in{size}/{mem_tok}/ep{passes}/knn{k}/{nn_tok}"
            f"{'/fp16' if mem_fp16 else ''}{'/nomatch' if matching == 'none' else ''}")
    metrics = {f"{base}/{m}": v for m, v in res.metrics.items()}
    figs = Path(out) / "figures"
    n = min(n_figures, len(va.images))
    if n:
        save_label_grid(figs / "hummingbird_predictions.png", va.images[:n],
                        {"ground truth": va.masks[:n].numpy(), "hummingbird": res.examples[:n]}, va.ignore_index)
    save_confusion(figs / "hummingbird_confusion.png", res.confusion, va.class_names, title="Hummingbird (before "
                   "matching)")
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "train_split": train_split, "split": split,
           "size": size, "memory_size": memory_size, "epochs": passes, "k": k, "beta": beta, "augment": augment,
           "train_fraction": train_fraction, "subset_seed": subset_seed, "seed": seed,
           "seconds": time.perf_counter() - t0}
    _write(out, "hummingbird", metrics, _meta("hummingbird", "hb2", cfg, rec, {"knn_backend": backend,
                                                                               "seeds": [seed]}))
    return 0


def _flip_images(images: list, seed: int) -> list:
    import numpy as np

    out = []
    for i, img in enumerate(images):
        r = np.random.default_rng([seed, i]).random(2)
        x = img[:, ::-1] if r[0] < 0.5 else img
        x = x[::-1] if r[1] < 0.5 else x
        out.append(np.ascontiguousarray(x))
    return out


@command("eval position")
def position(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14", weights: str = "pretrained",
             train_split: str = "train", split: str = "val", size: int = 224, n_train: int = 2000,
             decorrelate: str = "flip", probe: str = "sigmoid", epochs: int = 5, lr: float = 2e-4,
             batch_size: int = 128, n_images: int | None = None, features: Path | None = None,
             train_features: Path | None = None, device: str = "cpu", probe_seed: int = 400, seed: int = 0) -> int:
    """Position-prediction probe: MSE of (row, col) regression next to the chance level of the grid (spec §6).

    Args:
        data: dataset root (or any layout with images; masks are not needed).
        out: output folder (position.json, figures/).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        train_split: split the probe is trained on.
        split: evaluation split.
        size: squash size S.
        n_train: seeded subset of the train split (seed = seed).
        decorrelate: flip (random h/v flips per image before extraction) or none.
        probe: sigmoid (AdamW, the RASA probe) or ridge (closed form).
        epochs: sigmoid probe epochs.
        lr: sigmoid probe learning rate.
        batch_size: images per probe step.
        n_images: only the first n val images.
        features: val features from `dinokit features` (only with decorrelate none).
        train_features: train features from `dinokit features` (only with decorrelate none).
        device: torch device.
        probe_seed: probe initialisation / shuffling seed.
        seed: seed of the train subset and the flips.
    """
    from ..data.datasets import open_dataset
    from ..eval.hummingbird import select_subset
    from ..eval.position import position_probe
    from ..viz.figures import save_curves

    if decorrelate not in ("flip", "none"):
        raise ValueError(f"--decorrelate {decorrelate!r}: choose flip or none")
    if decorrelate == "flip" and (features or train_features):
        raise ValueError("precomputed --features cannot be flipped; pass --decorrelate none or let the command "
                         "extract the features")
    t0 = time.perf_counter()
    n_all = len(open_dataset(Path(data), train_split))
    sub = select_subset(n_all, min(1.0, n_train / max(1, n_all)), seed)
    tr = _open_split(data, train_split, size, indices=sub, need_masks=False)
    va = _open_split(data, split, size, n_images, need_masks=False)
    if decorrelate == "flip":
        tr.images, va.images = _flip_images(tr.images, seed), _flip_images(va.images, seed + 1)
    bb = None if features and train_features else _backbone(backbone, weights, device)
    tf, rec = _features(tr, train_features, backbone, weights, size, device, 32, bb)
    vf, _ = _features(va, features, backbone, weights, size, device, 32, bb)
    res = position_probe(tf, vf, probe=probe, epochs=epochs, lr=lr, batch_size=batch_size, seed=probe_seed,
                         device=device)
    base = f"{va.key}/position/{probe}/in{size}/{'flip' if decorrelate == 'flip' else 'noflip'}"
    metrics = {f"{base}/{k}": v for k, v in res.metrics.items()}
    if res.curve:
        save_curves(Path(out) / "figures" / "position_curve.png", {f"{probe} probe": res.curve}, ylabel="val MSE",
                    title=f"position probe, grid {tuple(vf.shape[1:3])}", hlines={"chance": res.metrics["chance"]})
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "train_split": train_split, "split": split,
           "size": size, "n_train": n_train, "decorrelate": decorrelate, "probe": probe, "epochs": epochs, "lr": lr,
           "batch_size": batch_size, "probe_seed": probe_seed, "seed": seed, "seconds": time.perf_counter() - t0}
    _write(out, "position", metrics, _meta("position", probe, cfg, rec, {"seeds": [seed, probe_seed]}))
    return 0


@command("eval entropy")
def entropy(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14", weights: str = "pretrained",
            split: str = "val", size: int = 448, k: int = 100, seeds: list[int] | None = None, niter: int = 100,
            nredo: int = 5, n_images: int | None = None, features: Path | None = None, batch_size: int = 32,
            device: str = "cpu", seed: int = 0) -> int:
    """Spatial entropy se1 of k-means clusters of the patch tokens (spec §7).

    Args:
        data: dataset root (masks are not needed).
        out: output folder (entropy.json).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        split: split to featurise.
        size: squash size S.
        k: number of clusters K.
        seeds: k-means seeds (default 0..4, averaged).
        niter: k-means iterations.
        nredo: k-means restarts.
        n_images: only the first n images (compare se only at equal M, K and grid).
        features: features written by `dinokit features`.
        batch_size: images per forward pass.
        device: torch device.
        seed: seed of the position shuffle of the se_shuffled control.
    """
    from ..eval.entropy import spatial_entropy_of_features

    t0 = time.perf_counter()
    seeds = list(seeds) if seeds is not None else [0, 1, 2, 3, 4]
    sp = _open_split(data, split, size, n_images, need_masks=False)
    feats, rec = _features(sp, features, backbone, weights, size, device, batch_size)
    res = spatial_entropy_of_features(feats, k=k, seeds=seeds, niter=niter, nredo=nredo)
    base = f"{sp.key}/spatial_entropy/se1/in{size}/k{k}"
    metrics = {f"{base}/{m}": v for m, v in res.items()}
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "split": split, "size": size, "k": k,
           "seeds": seeds, "n_images": len(sp.ids), "seed": seed, "seconds": time.perf_counter() - t0}
    _write(out, "entropy", metrics, _meta("entropy", "se1", cfg, rec, {"seeds": seeds}))
    return 0


@command("eval boxes")
def boxes(preds: Path, data: Path, out: Path = Path("runs/eval"), split: str = "val", protocol: str = "native",
          method: str = "pred", fmt: str = "xywh", hard: str = "keep", empty_gt: str = "miss",
          iou_mode: str = "standard", dataset_key: str | None = None, seed: int = 0) -> int:
    """Box metrics of one predicted box per image against the dataset's gt boxes: CorLoc, mean IoU, maIoU (spec §8).

    Args:
        preds: JSON {"<image id>": [x, y, w, h]} (the pseudo-box file of `dinokit boxes`), pixel coordinates.
        data: dataset root with gt boxes (VOC Annotations, CUB bounding_boxes.txt, synthetic layouts).
        out: output folder (boxes.json).
        split: dataset split.
        protocol: native (boxes in original-resolution pixels) or lost (CorLoc keys of LOST/TokenCut).
        method: name of the box source, used in the keys.
        fmt: format of the predicted boxes: xywh or xyxy.
        hard: keep (count difficult/truncated gt boxes) or drop (LOST --no_hard; needs per-box flags, else keep).
        empty_gt: images without gt boxes count as misses (miss) or are skipped (skip).
        iou_mode: standard or lost (LOST's epsilon formula).
        dataset_key: dataset name in the keys (default: the loader's key).
        seed: recorded seed (the computation is deterministic).
    """
    import numpy as np

    from ..data.crops import read_box_json
    from ..data.datasets import open_dataset
    from ..eval.boxes import corloc, maiou, miou_box, xywh_to_xyxy

    ds = open_dataset(Path(data), split)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {data} is empty")
    pred = read_box_json(preds, expected_ids=ds.ids, allow_extra=True)
    p_list, g_list, h_list = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        b = np.asarray(pred[str(item["id"])], np.float64)
        p_list.append(xywh_to_xyxy(b) if fmt == "xywh" else b)
        g = np.asarray(item.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        g_list.append(xywh_to_xyxy(g) if len(g) else g)
        h_list.append(np.asarray(item.get("box_hard", np.zeros(len(g), bool)), bool))
    key = dataset_key or getattr(ds, "key", "dataset")
    cl = corloc(p_list, g_list, hard=h_list, hard_mode=hard, empty_gt=empty_gt, iou_mode=iou_mode)
    if protocol == "lost":
        base = f"{key}-{split}/corloc/lost/{method}"
        metrics = {f"{base}/{m}": v for m, v in cl.items()}
    elif protocol == "native":
        base = f"{key}/boxes/native/{method}"
        metrics = {f"{base}/corloc": cl["corloc"], f"{base}/n_images": cl["n_images"],
                   f"{base}/maiou": maiou(p_list, g_list), f"{base}/miou_box": miou_box(p_list, g_list)}
    else:
        raise ValueError(f"--protocol {protocol!r}: choose native or lost")
    cfg = {"preds": str(preds), "data": str(data), "split": split, "protocol": protocol, "method": method,
           "hard": hard, "empty_gt": empty_gt, "iou_mode": iou_mode, "seed": seed}
    _write(out, "boxes", metrics, _meta("boxes", protocol, cfg, {"name": method}))
    return 0
