"""Demo stage: attention pseudo-boxes on the synthetic benchmark and a short crop-mode comparison of a classifier."""

from __future__ import annotations

import time

import numpy as np
import torch


def run(ctx) -> dict[str, float | int | str]:
    from ..data import crops as C
    from ..eval.boxes import corloc, miou_box
    from ..methods import classifier as K
    from ..methods.classifier.lightning import fit_classifier
    from ..viz.figures import draw_box_overlays
    from .foundation import demo_backbone, demo_scenes

    t0 = time.perf_counter()
    train = demo_scenes(ctx, "train", fine_grained=True)
    val = demo_scenes(ctx, "val", fine_grained=True)
    items = [train[i] for i in range(len(train))]
    images, ids, gts = [s.image for s in items], [s.image_id for s in items], [s.boxes for s in items]
    bb = ctx.cache.get("backbone") or demo_backbone(ctx)
    pred, degenerate = C.pseudo_boxes(bb, images, ids, C.BoxConfig(), device=ctx.device)
    p = np.asarray([pred[i] for i in ids], np.float64)
    H, W = images[0].shape[:2]
    whole = np.tile([0, 0, W, H], (len(ids), 1)).astype(np.float64)
    centre = np.tile([W / 4, H / 4, W / 2, H / 2], (len(ids), 1))
    main = [g[:1] for g in gts]
    m: dict[str, float | int | str] = {
        "boxes/miou": miou_box(p, main, fmt="xywh"),
        "boxes/corloc": corloc(p, main, fmt="xywh")["corloc"],
        "boxes/corloc_any_object": corloc(p, list(gts), fmt="xywh")["corloc"],
        "boxes/degenerate": len(degenerate),
        "boxes/baseline_whole_image_miou": miou_box(whole, main, fmt="xywh"),
        "boxes/baseline_whole_image_corloc": corloc(whole, main, fmt="xywh")["corloc"],
        "boxes/baseline_centre_box_miou": miou_box(centre, main, fmt="xywh"),
        "boxes/baseline_centre_box_corloc": corloc(centre, main, fmt="xywh")["corloc"],
    }
    fig_boxes = ctx.figures / "localisation_pseudo_boxes.png"
    draw_box_overlays(fig_boxes, images[:6], ids[:6], pred, gts[:6])
    t_boxes = time.perf_counter() - t0

    # short classifier runs: one tiny timm ResNet per crop mode, same data, seed and schedule
    size = max(32, (ctx.image_size * 3 // 4) // 8 * 8)
    epochs = 1 if ctx.quick else 3
    n_cls = 32 if ctx.quick else len(train)
    tr_src, va_src = K.SceneSource(items[:n_cls]), K.SceneSource(val)
    dens = C.OnlineDensityCrops(bb, size, C.DensityConfig(att_size=ctx.image_size, canvas=ctx.image_size),
                                seed=ctx.seed)
    modes = {"rrc": dict(mode="rrc"), "localized_gt": dict(mode="localized"),
             "localized_pseudo": dict(mode="localized", boxes=pred), "density": dict(mode="density")}
    table = {}
    for name, kw in modes.items():
        torch.manual_seed(ctx.seed)
        model = K.build_classifier("resnet10t", 5, "random", dict(channels=(8, 16, 32, 64), stem_width=8))
        ds = K.CropDataset(tr_src, True, kw["mode"], size, boxes=kw.get("boxes", "gt"), canvas=ctx.image_size)
        res, _ = fit_classifier(ds, K.CropDataset(va_src, False, "rrc", size), model,
                                K.RecipeConfig(lr=0.05, epochs=epochs, schedule="cosine", ema_every=2),
                                batch_size=16, density=dens if kw["mode"] == "density" else None, seed=ctx.seed)
        m[f"classify/{name}/acc"] = res["val/acc"]
        m[f"classify/{name}/acc_ema"] = res["val/acc_ema"]
        table[f"{name}: val acc / EMA acc"] = f"{res['val/acc']:.3f} / {res['val/acc_ema']:.3f}"
    accs = [m[f"classify/{n}/acc"] for n in modes]
    se = float(np.sqrt(0.2 * 0.8 / len(val)))
    m["classify/acc_spread"] = float(max(accs) - min(accs))
    m["classify/acc_binomial_se"] = se
    verdict = ("the spread between modes is within 2 binomial standard errors, so this run does not rank them"
               if m["classify/acc_spread"] <= 2 * se else
               "the spread between modes exceeds 2 binomial standard errors on this run (one seed only)")
    m["weights"] = "random"
    m["chance_acc"] = 1 / 5
    ctx.section(
        "Localisation: attention pseudo-boxes and crop modes",
        f"{bb.name} with RANDOM weights (weights='random'): its attention carries no learned objectness, so these "
        f"pseudo-boxes are a pipeline check, not a localisation result. {len(ids)} fine-grained scenes "
        f"({W}x{H}); box rule: last-block CLS attention, log values, outlier removal, box filter, fixed threshold "
        f"0.708, centroid box, in original pixels; {t_boxes:.1f} s. Compare with the whole-image and centre-box "
        f"baselines. Classifier: a tiny random-init resnet10t (width 8-64), {epochs} epoch(s) on {n_cls} "
        f"scenes, {size}px crops, crop modes rrc / localized (true main-object boxes) / localized (pseudo-boxes) / "
        f"density (online, batched, one demo_vit forward per batch). Chance is 0.2; {len(val)} validation scenes "
        f"(binomial s.e. at chance {se:.3f}); {verdict}.",
        [fig_boxes],
        {"pseudo-box mIoU (main object)": m["boxes/miou"], "pseudo-box CorLoc": m["boxes/corloc"],
         "whole-image box mIoU / CorLoc": f"{m['boxes/baseline_whole_image_miou']:.3f} / "
                                          f"{m['boxes/baseline_whole_image_corloc']:.3f}",
         "centre box mIoU / CorLoc": f"{m['boxes/baseline_centre_box_miou']:.3f} / "
                                     f"{m['boxes/baseline_centre_box_corloc']:.3f}", **table})
    return m
