"""Demo stage 2: the dense evaluation suite on the synthetic benchmark, for the demo ViT and for oracle features.

Features of ``demo_vit`` (random init) on the demo's train and val scenes (64x64 px, 8x8 tokens); the ORACLE row
uses one-hot ground truth per patch (the majority class of each 8x8-pixel cell), a sanity ceiling that is below 1
only because cells straddling object boundaries hold several classes. Everything is evaluated at the 64x64 mask
resolution (the ``fast100@S`` analogue) with small, fixed settings listed in the section text.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.extract import patch_features
from ..data.synthetic import num_seg_classes
from ..eval.boxes import corloc, maiou, miou_box, xywh_to_xyxy
from ..eval.entropy import spatial_entropy_of_features
from ..eval.hummingbird import hummingbird, soft_cell_labels
from ..eval.linear_seg import linear_probe
from ..eval.overcluster import overcluster
from ..eval.position import position_probe
from ..viz.figures import save_confusion, save_curves, save_label_grid
from .foundation import demo_backbone, demo_scenes


def extract(bb, scenes, device: str, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(N, h, w, D) fp32 patch features, (N, H, W) int64 masks and the uint8 images of ``scenes``."""
    imgs = [scenes[i].image for i in range(len(scenes))]
    masks = torch.from_numpy(np.stack([scenes[i].mask for i in range(len(scenes))]).astype(np.int64))
    return patch_features(bb, imgs, batch, device), masks, imgs


def oracle_features(masks: torch.Tensor, grid: tuple[int, int], num_classes: int, noise: float = 0.05,
                    seed: int = 0) -> torch.Tensor:
    """(N, H, W) masks -> (N, h, w, C) one-hot of each cell's majority class plus N(0, noise²) jitter (the jitter
    only breaks exact ties between duplicate points, which trap faiss k-means' random initialisation)."""
    onehot = F.one_hot(soft_cell_labels(masks, grid, num_classes).argmax(-1), num_classes).float()
    return onehot + noise * torch.randn(onehot.shape, generator=torch.Generator().manual_seed(seed))


def evaluate_features(tf: torch.Tensor, tm: torch.Tensor, vf: torch.Tensor, vm: torch.Tensor, c: int, seed: int,
                      quick: bool) -> tuple[dict[str, float], dict]:
    """Every evaluator on one feature set; returns (flat metrics, artefacts for the figures)."""
    seeds = (seed,) if quick else (seed, seed + 1, seed + 2)
    ks = [c, 3 * c]
    oc = overcluster(vf, vm, c, ks=ks, seeds=seeds, niter=50, nredo=1 if quick else 2, eval_size=vm.shape[-1])
    steps_per_epoch = max(1, tf.shape[0] // 16)
    epochs = -(-(40 if quick else 100) // steps_per_epoch)  # ~40 / 100 SGD steps of 16 images
    lp = linear_probe(tf, tm, vf, vm, c, lrs=(0.01, 0.1, 1.0), epochs=epochs, batch_size=16, eval_size=None,
                      seed=seed, eval_every=max(1, epochs // 5))
    hb = hummingbird(tf, tm, vf, vm, c, k=30, memory_size=None, seed=seed, n_examples=4)
    pp = position_probe(tf, vf, lr=1e-2, epochs=10 if quick else 40, batch_size=16, seed=seed)
    pr = position_probe(tf, vf, probe="ridge")
    se = spatial_entropy_of_features(vf, k=min(100, vf.shape[0] * vf.shape[1] * vf.shape[2] // 4), seeds=seeds,
                                     niter=50, nredo=1)
    m = {f"overcluster/k{k}/miou": oc.metrics[f"k{k}/miou"] for k in ks}
    m.update({"linear/miou": lp.metrics["miou"], "linear/best_lr": lp.metrics["best_lr"],
              "hummingbird/miou": hb.metrics["miou"], "position/sigmoid/mse": pp.metrics["mse"],
              "position/chance": pp.metrics["chance"], "position/sigmoid/r2": pp.metrics["r2"],
              "position/ridge/r2": pr.metrics["r2"], "spatial_entropy/se": se["se"],
              "spatial_entropy/se_ratio": se["se_ratio"]})
    return m, {"oc": oc, "lp": lp, "hb": hb, "pp": pp}


def run(ctx) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP start-up/spinning costs more than a second thread gains
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx) -> dict[str, float]:
    t0 = time.perf_counter()
    bb = ctx.cache.get("backbone") or demo_backbone(ctx)
    c = num_seg_classes()
    train, val = demo_scenes(ctx, "train"), demo_scenes(ctx, "val")
    tf, tm, _ = extract(bb, train, ctx.device)
    vf, vm, vimgs = extract(bb, val, ctx.device)
    grid = tuple(vf.shape[1:3])
    ctx.cache["eval_features"] = {"train": (tf, tm), "val": (vf, vm), "num_classes": c}
    rows: dict[str, dict[str, float]] = {}
    art: dict[str, dict] = {}
    rows["demo_vit (random init)"], art["vit"] = evaluate_features(tf, tm, vf, vm, c, ctx.seed, ctx.quick)
    rows["oracle (one-hot GT)"], art["oracle"] = evaluate_features(
        oracle_features(tm, grid, c, seed=ctx.seed), tm, oracle_features(vm, grid, c, seed=ctx.seed + 1), vm, c,
        ctx.seed, ctx.quick)
    n = min(4, len(vimgs))
    figs = [save_label_grid(ctx.figures / "evaluation_clusters.png", vimgs[:n], {
        "ground truth": vm[:n].numpy(),
        f"vit k{c} clusters": art["vit"]["oc"].cluster_maps[c][:n],
        f"vit k{3 * c} clusters": art["vit"]["oc"].cluster_maps[3 * c][:n],
        "vit hummingbird": art["vit"]["hb"].examples[:n],
        f"oracle k{c} clusters": art["oracle"]["oc"].cluster_maps[c][:n]})]
    figs.append(save_confusion(ctx.figures / "evaluation_linear_confusion.png", art["vit"]["lp"].confusion,
                               title="demo_vit (random init) linear probe, val"))
    curves = {f"vit {k}": v["val_miou"] for k, v in art["vit"]["lp"].curves.items()}
    curves.update({f"oracle {k}": v["val_miou"] for k, v in art["oracle"]["lp"].curves.items()})
    figs.append(save_curves(ctx.figures / "evaluation_linear_curves.png", curves, xlabel="evaluation (every few "
                            "epochs)", ylabel="val mIoU", title="linear probe, one head per learning rate"))
    figs.append(save_curves(ctx.figures / "evaluation_position_curve.png",
                            {"vit sigmoid probe": art["vit"]["pp"].curve,
                             "oracle sigmoid probe": art["oracle"]["pp"].curve},
                            ylabel="val MSE", title="position probe",
                            hlines={"chance": rows["oracle (one-hot GT)"]["position/chance"]}))
    # box metrics: the oracle uses the largest gt box of each val scene, the baseline the whole image
    gts = [xywh_to_xyxy(np.asarray(val[i].boxes, np.float64).reshape(-1, 4)) for i in range(len(val))]
    largest = [g[np.argmax((g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]))] for g in gts]
    whole = [np.array([0, 0, ctx.image_size, ctx.image_size], np.float64)] * len(gts)
    for name, preds in (("oracle (one-hot GT)", largest), ("demo_vit (random init)", whole)):
        cl = corloc(preds, gts)
        rows[name].update({"boxes/corloc": cl["corloc"], "boxes/miou_box": miou_box(preds, gts),
                           "boxes/maiou": maiou(preds, gts)})
    metrics_order = list(next(iter(rows.values())))
    table = {f"{name} | {k}": round(v, 4) for name, r in rows.items() for k, v in r.items()}
    dt = time.perf_counter() - t0
    ctx.section(
        "Dense evaluation suite",
        f"{bb.name}: RANDOM initialisation (weights='random'), so its numbers are those of an untrained network; the "
        f"oracle row feeds one-hot ground truth per patch (majority class of each cell, + N(0, 0.05^2) jitter; the "
        f"ceiling is < 1 because boundary cells mix classes). {len(train)} train / {len(val)} val synthetic scenes of "
        f"{ctx.image_size}px, grid {grid}, {c} classes, evaluated at the mask resolution. Overclustering: standardise "
        f"+ PCA + faiss k-means (K = {c} Hungarian, K = {3 * c} many-to-one), seeds averaged; with faiss' random "
        f"initialisation K = {c} tends to split the dominant background (~85% of pixels) and merge objects, even for "
        f"the oracle, while K = {3 * c} reaches the patch-level ceiling. Linear: 1x1 conv heads for lr "
        f"0.01/0.1/1 trained together, best on val. Hummingbird: memory = all train cells, k = 30, beta = 0.02, "
        f"Hungarian. Position: sigmoid probe (lr 1e-2, chance MSE {rows['oracle (one-hot GT)']['position/chance']:.4f}"
        f") and ridge R2. Spatial entropy se1 (1 = no position information). Boxes: the vit row uses the whole "
        f"image as its box (a baseline, no model involved), the oracle row the largest gt box. Metrics: "
        f"{', '.join(metrics_order)}. {dt:.1f} s.", figs, table)
    out: dict[str, float] = {}
    for tag, name in (("vit", "demo_vit (random init)"), ("oracle", "oracle (one-hot GT)")):
        out.update({f"{tag}/{k}": v for k, v in rows[name].items()})
    out["weights"] = "random"
    return out
