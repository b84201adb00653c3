"""Demo stage 3: RASA on the synthetic benchmark with the demo ViT (learned absolute position embeddings).

A RASA head is fitted stage by stage on frozen ``demo_vit`` tokens (random init) of the train scenes seen through
three image-level views (identity, a random flip, a random 90/270-degree rotation: content moves, the position
targets do not), validated on the val scenes with the chance stopping rule. The position probe, overclustering and
the linear probe are then measured before and after on the held-out test scenes.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..data.synthetic import num_seg_classes
from ..eval.linear_seg import linear_probe
from ..eval.overcluster import overcluster
from ..eval.position import position_probe
from ..methods.rasa import chance_mse, fit_rasa_features, stage_curve
from ..viz import pca_rgb, save_grid, upsample_map
from .evaluation import extract
from .foundation import demo_backbone, demo_scenes


@contextlib.contextmanager
def _threads(n: int):
    """Small-tensor loops run faster on one intra-op thread on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _views(images: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Two extra views of every (square) image: a random flip (h, v or both) and a random 90/270-degree rotation."""
    rng = np.random.default_rng(seed)
    flips = (lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1])
    out = [flips[rng.integers(3)](im) for im in images]
    out += [np.rot90(im, 1 + 2 * int(rng.integers(2))) for im in images]
    return [np.ascontiguousarray(a) for a in out]


def _features(bb, images: list[np.ndarray], device: str, batch: int = 64) -> torch.Tensor:
    from ..data.transforms import to_tensor_batch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(bb.forward_features(to_tensor_batch(images[i:i + batch], bb.mean, bb.std, device))
                       .patch.float().cpu())
    return torch.cat(out)


def _evaluate(tf, tm, ef, em, c: int, seed: int, quick: bool) -> dict[str, float]:
    seeds = (seed,) if quick else (seed, seed + 1, seed + 2)
    ks = [c, 3 * c]
    oc = overcluster(ef, em, c, ks=ks, seeds=seeds, niter=50, nredo=1 if quick else 2, eval_size=em.shape[-1])
    lp = linear_probe(tf, tm, ef, em, c, lrs=(0.01, 0.1, 1.0), epochs=8 if quick else 25, batch_size=16,
                      eval_size=None, seed=seed, eval_every=0)
    pp = position_probe(tf, ef, lr=1e-2, epochs=10 if quick else 40, batch_size=16, seed=seed)
    pr = position_probe(tf, ef, probe="ridge")
    m = {f"overcluster/k{k}/miou": oc.metrics[f"k{k}/miou"] for k in ks}
    m.update({"linear/miou": lp.metrics["miou"], "position/sigmoid/mse": pp.metrics["mse"],
              "position/sigmoid/r2": pp.metrics["r2"], "position/ridge/mse": pr.metrics["mse"],
              "position/ridge/r2": pr.metrics["r2"], "position/chance": pp.metrics["chance"]})
    return m


def run(ctx) -> dict[str, float | int | str]:
    t0 = time.perf_counter()
    bb = ctx.cache.get("backbone") or demo_backbone(ctx)
    c = num_seg_classes()
    train, val, test = demo_scenes(ctx, "train"), demo_scenes(ctx, "val"), demo_scenes(ctx, "test")
    cached = ctx.cache.get("eval_features")  # the evaluation stage's features of the same scenes and backbone
    if cached is not None and "backbone" in ctx.cache:
        (tf, tm), (vf, _) = cached["train"], cached["val"]
        timgs = [train[i].image for i in range(len(train))]
    else:
        tf, tm, timgs = extract(bb, train, ctx.device)
        vf, _, _ = extract(bb, val, ctx.device)
    ef, em, eimgs = extract(bb, test, ctx.device)
    rasa_train = torch.cat([tf, _features(bb, _views(timgs, ctx.seed), ctx.device)])
    h, w = tf.shape[1:3]
    stages = 3 if ctx.quick else 6
    with _threads(1):
        res = fit_rasa_features(rasa_train, vf, stopping="chance", rtol=0.05, max_stages=stages, min_stages=1,
                                steps=100 if ctx.quick else 300, batch_size=32, lr=1e-2, seed=400 + ctx.seed,
                                pos_embed=lambda hh, ww: bb.position_embedding(hh, ww).detach().float().cpu())
        t_fit = time.perf_counter() - t0
        head = res.head
        before = _evaluate(tf, tm, ef, em, c, ctx.seed, ctx.quick)
        after = _evaluate(head(tf), tm, head(ef), em, c, ctx.seed, ctx.quick)
    curve_png, curve_json = ctx.figures / "rasa_stage_curve.png", ctx.out / "rasa_stage_curve.json"
    stage_curve(res.records, curve_png, curve_json, title="RASA stages, demo_vit (random init)")
    n = min(4, len(eimgs))
    size = (ctx.image_size, ctx.image_size)
    raw_rgb, deb_rgb = pca_rgb(ef[:n]), pca_rgb(head(ef[:n]))
    pca_fig = save_grid(ctx.figures / "rasa_pca.png",
                        [[eimgs[i], upsample_map(raw_rgb[i], size), upsample_map(deb_rgb[i], size)] for i in range(n)],
                        [["image", "PCA raw", f"PCA after RASA ({head.n_stages} st.)"] for _ in range(n)])
    chance = chance_mse(h, w)
    out: dict[str, float | int | str] = {"n_stages": head.n_stages, "stop_reason": res.stop_reason,
                                         "chance": chance, "weights": "random", "fit_seconds": round(t_fit, 2)}
    for r in res.records:
        out[f"stage{r.stage}/val/mse"] = r.mse
        out[f"stage{r.stage}/val/r2"] = r.r2
    out.update({f"before/{k}": v for k, v in before.items()})
    out.update({f"after/{k}": v for k, v in after.items()})
    pb, pa = before["position/sigmoid/mse"], after["position/sigmoid/mse"]
    out["after/position/sigmoid/gap_to_chance_pct"] = 100.0 * (chance - pa) / chance  # <= 5: within 5% of chance
    out["linear/miou_drop_points"] = 100.0 * (before["linear/miou"] - after["linear/miou"])
    table = {"stages committed": head.n_stages, "stop reason": res.stop_reason, "chance MSE": round(chance, 5)}
    for k in before:
        table[f"{k}: before -> after"] = f"{before[k]:.4f} -> {after[k]:.4f}"
    dt = time.perf_counter() - t0
    ctx.section(
        "RASA: removing absolute position from patch tokens",
        f"{bb.name} with RANDOM initialisation (weights='random'); its learned absolute position embeddings are "
        f"random too, so the position signal in its tokens is that of an untrained network (weak), and the numbers "
        f"only exercise the method. Head fitted on {rasa_train.shape[0]} token maps ({len(timgs)} train scenes x 3 "
        f"image-level views: identity, a random flip, a random 90-degree rotation), one fresh sigmoid probe per "
        f"stage (AdamW lr 1e-2, {300 if not ctx.quick else 100} steps, batch 32, cosine), validated on {len(val)} "
        f"val scenes, stopping when the fresh probe's val MSE is "
        f"within 5% of chance (min 1 stage, max {stages}): {head.n_stages} stage(s), stop reason "
        f"'{res.stop_reason}'. Evaluated on {len(test)} held-out test scenes, grid {h}x{w}: position probe "
        f"(sigmoid and ridge, fresh probes trained on the train scenes) MSE before {pb:.4f} -> after {pa:.4f} vs "
        f"chance {chance:.4f}; overclustering (K = {c}, {3 * c}) and linear probe mIoU before -> after in the "
        f"table. {dt:.1f} s.", [curve_png, pca_fig], table)
    ctx.cache["rasa_head"] = head
    return out
