"""``dinokit eval {overcluster,linear,hummingbird,position,entropy,boxes}``: dataset -> features -> JSON + figures.

Each command opens a dataset with :func:`dinokit.data.datasets.open_dataset`, squashes images to ``size`` x ``size``
(antialiased bilinear; masks nearest at pixel centres), extracts patch features with the backbone (or reads feature
shards written by ``dinokit features`` with ``--features DIR``, checked against the configured backbone and grid),
runs the evaluator and writes ``<out>/<task>.json`` (flat keys, see docs/eval/index.md, plus ``meta/*`` strings and
a ``meta``
provenance block, atomically) and figures under ``<out>/figures``. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import command, group
from .evaluation import (
    _backbone,
    _dist_setup,
    _extract,
    _features,
    _figure_items,
    _meta,
    _open_split,
    _split_size,
    _workdir,
    _write,
    stream_features,
    subset_token,
    write_result,
)

group("eval", "Dense evaluation protocols: overclustering, linear probe, Hummingbird, position, entropy, boxes")


@command("eval overcluster")
def overcluster(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14",
                weights: str = "pretrained", split: str = "val", size: int = 448, protocol: str = "fast100",
                ks: list[int] | None = None, seeds: list[int] | None = None, niter: int = 100, nredo: int = 5,
                kmeans_backend: str = "faiss", n_images: int | None = None, features: Path | None = None,
                batch_size: int = 32, num_workers: int = 0, device: str = "cpu", n_figures: int = 4,
                seed: int = 0) -> int:
    """Overclustering (k-means segmentation) mIoU of the evaluation split (docs/eval/index.md).

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
        num_workers: DataLoader worker processes decoding and resizing images.
        device: torch device (under torchrun, cuda means cuda:LOCAL_RANK).
        n_figures: images drawn in the cluster-map figure.
        seed: recorded seed (k-means seeds are given by seeds).
    """
    from ..data.sources import open_split
    from ..eval.metrics import rank_shard
    from ..eval.overcluster import OverclusterStream
    from ..viz.figures import save_confusion, save_label_grid

    t0 = time.perf_counter()
    rank, world, device = _dist_setup(device)
    seeds = list(seeds) if seeds is not None else [0, 1, 2, 3, 4]
    n_all = _split_size(data, split, n_images)
    loader = open_split(data, split, size, batch_size=batch_size, num_workers=num_workers,
                        mask_size="full" if protocol == "full" else 100, indices=rank_shard(n_all, rank, world))
    sp = loader.dataset
    with _workdir(out, "overcluster") as tmp:
        acc = OverclusterStream(tmp, sp.num_classes, protocol, sp.ignore_index)
        batches, rec = stream_features(loader, features, backbone, weights, size, device)
        for f, batch in batches:
            acc.add(f, batch["mask"], batch["index"].tolist())
        res = acc.compute(ks=ks, seeds=seeds, niter=niter, nredo=nredo, backend=kmeans_backend,
                          n_maps=max(1, n_figures))
    if res is None:  # not global rank 0
        return 0
    base = f"{sp.key}/overcluster/{protocol}/in{size}"
    metrics = {f"{base}/{k}": v for k, v in res.metrics.items()}
    figs = Path(out) / "figures"
    n = min(n_figures, n_all)
    if n:
        imgs, gt = _figure_items(data, split, size, n)
        save_label_grid(figs / "overcluster_maps.png", imgs,
                        {"ground truth": gt, **{f"k{k} clusters": m[:n] for k, m in res.cluster_maps.items()}},
                        sp.ignore_index)
    k0 = sp.num_classes if sp.num_classes in res.confusion else next(iter(res.confusion))
    save_confusion(figs / "overcluster_confusion.png", res.confusion[k0], sp.class_names,
                   title=f"K={k0} clusters (seed {seeds[0]}) vs ground truth")
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "split": split, "size": size,
           "protocol": protocol, "ks": ks, "seeds": seeds, "niter": niter, "nredo": nredo, "n_images": n_images,
           "features": str(features) if features else None, "world_size": world, "seed": seed,
           "seconds": time.perf_counter() - t0}
    write_result(out, "overcluster", metrics, _meta("overcluster", protocol, cfg, rec,
                                                    {"kmeans_backend": kmeans_backend, "seeds": seeds}),
                 show=("/miou",))
    return 0


@command("eval linear")
def linear(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14", weights: str = "pretrained",
           train_split: str = "train", split: str = "val", size: int = 448, protocol: str = "fast100",
           lrs: list[float] | None = None, epochs: int = 25, iterations: int = 40_000, batch_size: int | None = None,
           eval_size: int | None = 100, train_fraction: float | None = None, subset_seed: int = 400,
           n_images: int | None = None, features: Path | None = None, train_features: Path | None = None,
           num_workers: int = 0, device: str = "cpu", seed: int = 400) -> int:
    """Linear segmentation probe on frozen features, several learning rates in one pass (docs/eval/index.md).

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
        num_workers: DataLoader worker processes decoding the images.
        device: torch device (under torchrun, cuda means cuda:LOCAL_RANK).
        seed: probe seed (head init, shuffling).
    """
    import torch

    from ..backbones.extract import all_gather_rows, features_to_memmap
    from ..data.sources import open_split
    from ..eval.hummingbird import select_subset
    from ..eval.linear_seg import linear_probe, lr_token
    from ..eval.metrics import rank_shard
    from ..viz.figures import save_confusion, save_curves

    t0 = time.perf_counter()
    rank, world, device = _dist_setup(device)
    n_train = _split_size(data, train_split, None)
    sub = select_subset(n_train, train_fraction, subset_seed)
    n_val = _split_size(data, split, n_images)
    ms = eval_size if protocol == "fast100" and eval_size is not None else None
    bb = None if features and train_features else _backbone(backbone, weights, device)
    with _workdir(out, "linear") as tmp:
        arrays = {}
        for which, sp_name, feat_dir, rows_all, mask_size in (
                ("train", train_split, train_features, sub, ms),
                ("val", split, features, list(range(n_val)), "full" if protocol == "full" else ms)):
            mine = [rows_all[j] for j in rank_shard(len(rows_all), rank, world)]
            loader = open_split(data, sp_name, size, batch_size=32, num_workers=num_workers, mask_size=mask_size,
                                indices=mine)
            batches, r = stream_features(loader, feat_dir, backbone, weights, size, device, bb)
            if which == "train":
                rec, tr_ds = r, loader.dataset
            else:
                va = loader.dataset
            f, m, seen = features_to_memmap(batches, Path(tmp), len(mine), which)
            pos = {i: j for j, i in enumerate(rows_all)}
            f, m = all_gather_rows([f, m], [pos[i] for i in seen], Path(tmp), which, len(rows_all))
            arrays[which] = (torch.from_numpy(f), m if isinstance(m, list) else torch.from_numpy(m))
        del tr_ds
        res = linear_probe(arrays["train"][0], arrays["train"][1], arrays["val"][0], arrays["val"][1],
                           va.num_classes, protocol=protocol, lrs=lrs, epochs=epochs, iterations=iterations,
                           batch_size=batch_size, eval_size=eval_size if protocol == "fast100" else None,
                           ignore_index=va.ignore_index, seed=seed, device=device, class_names=va.class_names)
        del arrays
    if rank != 0:
        return 0
    name = protocol if protocol == "full" or eval_size is not None else f"{protocol}@{size}"
    sub_tok = f"/{subset_token(train_fraction, subset_seed)}" if train_fraction else ""
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
    """One Hummingbird memory view (docs/eval/index.md): colour jitter (brightness, contrast, saturation, hue 0.1, each
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
                num_workers: int = 0, device: str = "cpu", n_figures: int = 4, seed: int = 0) -> int:
    """Hummingbird dense nearest-neighbour retrieval, protocol hb2 (docs/eval/index.md).

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
        num_workers: DataLoader worker processes decoding the query images.
        device: torch device (under torchrun, cuda means cuda:LOCAL_RANK).
        n_figures: val images drawn in the prediction figure.
        seed: seed of the augmentations and the memory sampling.
    """
    import torch

    from ..data.datasets import open_dataset
    from ..eval.hummingbird import resolve_backend, select_subset
    from ..viz.figures import save_confusion, save_label_grid

    t0 = time.perf_counter()
    rank, world, device = _dist_setup(device)
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
    from ..data.sources import open_split
    from ..eval.hummingbird import HummingbirdEvaluator
    from ..eval.metrics import rank_shard

    n_val = _split_size(data, split, n_images)
    loader = open_split(data, split, size, batch_size=batch_size, num_workers=num_workers,
                        indices=rank_shard(n_val, rank, world), mask_rule="torch")
    va = loader.dataset
    ev = HummingbirdEvaluator(memory, va.num_classes, k, beta, knn_backend, va.ignore_index)
    batches, rec = stream_features(loader, features, backbone, weights, size, device, bb)
    examples: dict[int, object] = {}
    for f, batch in batches:  # one query batch alive at a time; only the C x C confusion matrix is kept
        idx = batch["index"].tolist()
        want = any(i < n_figures for i in idx)
        preds = ev.update(f, batch["mask"], return_predictions=want)
        if want:
            examples.update({i: p.numpy() for i, p in zip(idx, preds, strict=True) if i < n_figures})
    res = ev.compute(matching=matching, class_names=va.class_names, examples=[examples[i] for i in sorted(examples)])
    if rank != 0:
        return 0
    backend = resolve_backend(knn_backend)
    nn_tok = backend if backend.startswith("ivf") else "exact"
    sub_tok = f"/{subset_token(train_fraction, subset_seed)}" if train_fraction else ""
    mem_tok = f"mem{memory_size}" if memory_size is not None else "memall"
    base = (f"{va.key}/hummingbird/hb2{sub_tok}/in{size}/{mem_tok}/ep{passes}/knn{k}/{nn_tok}"
            f"{'/fp16' if mem_fp16 else ''}{'/nomatch' if matching == 'none' else ''}")
    metrics = {f"{base}/{m}": v for m, v in res.metrics.items()}
    figs = Path(out) / "figures"
    n = min(n_figures, len(res.examples))
    if n:
        ex_ids = sorted(examples)[:n]
        imgs, gt = _figure_items(data, split, size, max(ex_ids) + 1, mask_rule="torch")
        save_label_grid(figs / "hummingbird_predictions.png", [imgs[i] for i in ex_ids],
                        {"ground truth": gt[ex_ids], "hummingbird": res.examples[:n]}, va.ignore_index)
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
    """Position-prediction probe: MSE of (row, col) regression next to the chance level (docs/eval/position.md).

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
    """Spatial entropy se1 of k-means clusters of the patch tokens (docs/eval/index.md).

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
          iou_mode: str = "standard", dataset_key: str | None = None, clip_boxes: bool = False, seed: int = 0) -> int:
    """Box metrics of one predicted box per image against the dataset's gt boxes: CorLoc, mean IoU, maIoU.

    See docs/eval/boxes.md.

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
        clip_boxes: clip predicted boxes that leave their image to it (default: such a box is an error).
        seed: recorded seed (the computation is deterministic).
    """
    import numpy as np

    from ..data.crops import read_box_json
    from ..data.crops.localized import validate_box
    from ..data.datasets import open_dataset
    from ..errors import BoxError, MissingFileError, UsageError, check_out_dir
    from ..eval.boxes import corloc, maiou, miou_box, xywh_to_xyxy

    if fmt not in ("xywh", "xyxy"):
        raise UsageError(f"--fmt {fmt!r}: choose xywh or xyxy")
    check_out_dir(out)
    ds = open_dataset(Path(data), split)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {data} is empty")
    pred = read_box_json(preds, expected_ids=ds.ids, allow_extra=True)
    items = [ds[i] for i in range(len(ds))]
    if all(it.get("boxes") is None for it in items):  # the metric needs gt boxes: never score against nothing
        need = Path(data) / "bounding_boxes.txt" if getattr(ds, "key", "") == "cub" else Path(data)
        raise MissingFileError(f"no ground-truth boxes for split {split!r} of {data}: {need} is missing or empty",
                               hint="restore the dataset's box annotations (CUB: bounding_boxes.txt)")
    p_list, g_list, h_list = [], [], []
    for item in items:
        b = np.asarray(pred[str(item["id"])], np.float64)
        if item.get("image") is not None:  # one validator for every box reader: in image, positive size, finite
            xywh = b if fmt == "xywh" else np.array([b[0], b[1], b[2] - b[0], b[3] - b[1]])
            try:
                xywh = np.asarray(validate_box(xywh, np.asarray(item["image"]).shape[:2], item["id"], clip_boxes))
            except BoxError as err:
                raise BoxError(f"{preds}: {err}", hint=err.hint) from err
            b = xywh if fmt == "xywh" else np.array([xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]])
        p_list.append(xywh_to_xyxy(b) if fmt == "xywh" else b)
        g = np.asarray(item.get("boxes") if item.get("boxes") is not None else np.zeros((0, 4)),
                       np.float64).reshape(-1, 4)
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
           "hard": hard, "empty_gt": empty_gt, "iou_mode": iou_mode, "clip_boxes": clip_boxes, "seed": seed}
    _write(out, "boxes", metrics, _meta("boxes", protocol, cfg, {"name": method}))
    return 0


@command("eval feature-norm")
def feature_norm(data: Path, out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14",
                 weights: str = "pretrained", split: str = "val", size: int = 224, n_images: int | None = None,
                 features: Path | None = None, batch_size: int = 32, device: str = "cpu", seed: int = 0) -> int:
    """Per-token L2 norm of the patch features of a split (mean, std, min, max): a check for collapsed features.

    Args:
        data: dataset root or image folder (masks are not needed).
        out: output folder (feature-norm.json).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        split: split to featurise.
        size: squash size S.
        n_images: only the first n images.
        features: features written by `dinokit features`.
        batch_size: images per forward pass.
        device: torch device.
        seed: recorded seed (the computation is deterministic).
    """
    from ..eval.feature_norm import feature_norm as run

    sp = _open_split(data, split, size, n_images, need_masks=False)
    feats, rec = _features(sp, features, backbone, weights, size, device, batch_size)
    metrics = {f"{sp.key}/feature_norm/in{size}/{k}": v for k, v in run(feats).items()}
    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "split": split, "size": size,
           "n_images": len(sp.ids), "seed": seed}
    write_result(out, "feature-norm", metrics, _meta("feature-norm", "l2", cfg, rec), show=("/mean", "/std"))
    return 0
