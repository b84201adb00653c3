"""``dinokit boxes``, ``dinokit crops maiou-curve`` and ``dinokit crops density-cache`` (crops.md §1, §2.3, §3.3)."""

from __future__ import annotations

import json
from pathlib import Path

from . import command, group

group("crops", "Attention-guided crops: the maIoU curve and the attention-density cache")


def _load_images(data: str, split: str, split_mode: str, n_images: int, image_size: int, seed: int,
                 fine_grained: bool = True, aliases: dict | None = None) -> tuple[list, list[str], list | None, str]:
    """(images, ids, gt boxes per image (M_i, 4) xywh or None, dataset key) for ``synthetic`` or a CUB root.

    CUB ids are the dataset ids (``images.txt`` paths, as ``dinokit eval boxes`` and the datasets use); ``aliases``,
    when given, receives {numeric CUB id: dataset id}."""
    import numpy as np

    from ..errors import check_positive

    check_positive(n_images, "--n_images")
    check_positive(image_size, "--image_size")

    if data == "synthetic":
        from ..data.synthetic import SyntheticScenes

        scenes = SyntheticScenes(n_images, (image_size, image_size), seed=seed, fine_grained=fine_grained)
        items = [scenes[i] for i in range(len(scenes))]
        return [s.image for s in items], [s.image_id for s in items], [s.boxes for s in items], "synthetic"
    from ..data.datasets import CUB200

    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"data={data!r}: not 'synthetic' and no such CUB-200-2011 folder")
    parts = [("train", "official"), ("test", "official")] if split == "all" else [(split, split_mode)]
    images, ids, gts = [], [], []
    for sp, mode in parts:
        ds = CUB200(root, split=sp, split_mode=mode)
        for i, rec in enumerate(ds.records):
            images.append(np.asarray(ds[i]["image"]))
            ids.append(str(rec.id))
            if aliases is not None:
                aliases[str(ds.cub_ids[i])] = str(rec.id)
            gts.append(rec.boxes)  # None where bounding_boxes.txt has no entry (or is missing)
    return images, ids, gts, "cub"


@command("boxes")
def boxes(data: str = "synthetic", out: Path = Path("runs/boxes/boxes.json"), backbone: str = "demo_vit",
          weights: str = "random", split: str = "all", split_mode: str = "dinov2_consistent", n_images: int = 64,
          image_size: int = 64, block: int = -1, size: str = "native", autocontrast: bool = True,
          values: str = "logit", outlier: bool = True, rule: str = "fixed", threshold: float | None = None,
          tau: float = 0.6, box: str = "centroid", largest_component: bool = False, batch_size: int = 32,
          n_overlays: int = 8, no_metrics: bool = False, device: str = "cpu", seed: int = 0) -> int:
    """Pseudo ground-truth boxes from CLS attention: JSON {image_id: [x, y, w, h]}, metadata, overlays, metrics.

    Args:
        data: ``synthetic`` (fine-grained scenes, main object = boxes[0]) or a CUB-200-2011 root.
        out: the box JSON; ``<name>.meta.json``, ``<name>.metrics.json`` and ``<name>.overlays.png`` go next to it.
        backbone: backbone name (e.g. dinov2_vits14, demo_vit).
        weights: ``pretrained``, a tag, a local file, or ``random``.
        split: CUB split (``all`` = every image, as the reference) or train/val/test under ``split_mode``.
        split_mode: CUB split mode when split is not ``all``.
        n_images: synthetic scenes to render.
        image_size: side of the synthetic scenes.
        block: attention block (negative counts from the end).
        size: backbone input rule: ``native`` or ``short:S``.
        autocontrast: autocontrast the image before the backbone (as the reference).
        values: ``logit`` (log attention, default) or ``prob``.
        outlier: replace each head's maximum by its mean.
        rule: ``fixed`` (m >= threshold) or ``mass`` (keep tau of the attention mass).
        threshold: the fixed-rule threshold on the min-max map (default: the reference's uint8 chain, 0.70793).
        tau: mass fraction of the mass rule.
        box: ``centroid`` (the reference rule) or ``extent``.
        largest_component: keep the largest 8-connected component of the mask.
        batch_size: images per backbone forward (images are bucketed by input size).
        n_overlays: figures drawn for the first N images.
        no_metrics: write the boxes only (no metrics against gt boxes; needed for a CUB root without
            bounding_boxes.txt).
        device: torch device.
        seed: seed of the synthetic scenes.
    """
    import numpy as np
    import torch

    from ..backbones import load_backbone
    from ..data import crops as C
    from ..errors import check_out_file, check_positive, strict_json
    from ..eval.boxes import box_aiou, corloc, miou_box
    from ..io import atomic_write_text, dinokit_version, run_metadata

    check_positive(batch_size, "--batch_size")
    check_out_file(out)
    torch.manual_seed(seed)
    threshold = C.FIXED_THRESHOLD if threshold is None else threshold
    cfg = C.BoxConfig(block=block, size=size, autocontrast=autocontrast, values=values, outlier=outlier, rule=rule,
                      threshold=threshold, tau=tau, box=box, largest_component=largest_component,
                      batch_size=batch_size)
    aliases: dict = {}
    images, ids, gts, key = _load_images(data, split, split_mode, n_images, image_size, seed, aliases=aliases)
    if no_metrics:
        gts = None
    elif gts is not None and any(g is None for g in gts):
        from ..errors import MissingFileError

        lacking = [i for i, g in zip(ids, gts, strict=True) if g is None]
        raise MissingFileError(f"{Path(data) / 'bounding_boxes.txt'} is missing or lacks {len(lacking)} image(s) "
                               f"(first: {lacking[:3]}): the metrics need the gt boxes",
                               hint="restore bounding_boxes.txt, or pass --no_metrics to write the boxes only")
    bb = load_backbone(backbone, weights=weights, device=device).eval()
    pred, degenerate = C.pseudo_boxes(bb, images, ids, cfg, device=device)
    out = Path(out)
    meta = {"backbone": bb.name, "weights": bb.weights_info, "block": block, "size": size,
            "autocontrast": autocontrast, "values": values, "outlier": outlier, "rule": rule,
            "threshold": threshold, "tau": tau, "box": box, "largest_component": largest_component,
            "dinokit_version": dinokit_version(), "count": len(pred), "degenerate_ids": degenerate,
            "data": data, "split": split, "split_mode": split_mode, "seed": seed, "id_scheme": "dataset"}
    if aliases:  # numeric images.txt id -> dataset id, so readers keyed by the numeric id still find their boxes
        meta["id_aliases"] = aliases
    if rule == "fixed":
        meta["kernel"] = "max(3, floor(0.2 h)) x max(3, floor(0.2 w)), odd"
    C.write_box_json(out, pred, meta)
    stem = out.with_suffix("")
    if n_overlays > 0:
        from ..viz.figures import draw_box_overlays

        draw_box_overlays(stem.with_name(stem.name + ".overlays.png"), images[:n_overlays], ids[:n_overlays], pred,
                  gts[:n_overlays] if gts else None)
    metrics: dict = {}
    if gts is not None:
        src = f"{bb.name}-b{block % bb.depth}-{rule}-{box}"
        p = np.asarray([pred[i] for i in ids], np.float64)
        metrics[f"{key}/boxes/native/{src}/miou_box"] = miou_box(p, list(gts), fmt="xywh")
        metrics[f"{key}/boxes/native/{src}/maiou"] = float(np.mean(
            [box_aiou(p[n:n + 1], g, fmt="xywh").max() if len(g) else 0.0 for n, g in enumerate(gts)]))
        metrics[f"{key}/boxes/native/{src}/corloc"] = corloc(p, list(gts), fmt="xywh")["corloc"]
        if key == "synthetic":  # the main object only
            main = [g[:1] for g in gts]
            metrics[f"{key}/boxes/native/{src}/main/miou_box"] = miou_box(p, main, fmt="xywh")
            metrics[f"{key}/boxes/native/{src}/main/corloc"] = corloc(p, main, fmt="xywh")["corloc"]
        payload = {**metrics, "meta": run_metadata(meta, "boxes/native", bb.weights_info)}
        atomic_write_text(stem.with_name(stem.name + ".metrics.json"), strict_json(payload))
    print(strict_json({"boxes": str(out), "count": len(pred), "degenerate": len(degenerate), **metrics}))
    return 0


def _parse_range(spec: str) -> list[float]:
    try:
        if ":" in spec:
            a, b, s = (float(v) for v in spec.split(":"))
            n = int(round((b - a) / s))
            return [round(a + k * s, 10) for k in range(n + 1)]
        return [float(v) for v in spec.split(",")]
    except ValueError as err:
        raise ValueError(f"thr={spec!r}: expected start:stop:step (e.g. 0:1:0.1) or a comma list") from err


@command("crops maiou-curve")
def maiou_curve(boxes: str = "synthetic", data: str | None = None, thr: str = "0:1:0.1", maiou: float | None = None,
                n_images: int = 20000, out: Path = Path("runs/maiou_curve"), clip_boxes: bool = False,
                seed: int = 0) -> int:
    """maIoU of LocalizedRandomResizedCrop against thr on a set of boxes, plotted next to the published curve.

    Args:
        boxes: ``synthetic`` (the spec's 500x375 set), ``gt`` (the dataset's boxes) or a pseudo-box JSON file.
        data: CUB-200-2011 root (needed for ``gt`` and a box file: image sizes and ids).
        thr: thresholds, ``start:stop:step`` or a comma list.
        maiou: only convert this maIoU to thr through the fit thr = (2 (m - 0.5))^2.5 and print it.
        n_images: size of the synthetic set.
        out: output folder (maiou_curve.json, maiou_curve.png).
        clip_boxes: clip boxes that leave their image to it instead of refusing the box file.
        seed: seed of the synthetic set and of the crops.
    """
    import numpy as np

    from ..data import crops as C
    from ..errors import check_out_dir, check_positive, strict_json
    from ..io import atomic_write_text, run_metadata
    from ..viz.figures import save_figure

    if maiou is not None:
        if maiou > 1:
            print(json.dumps({"maiou": maiou, "crop": "rrc"}))
        else:
            print(json.dumps({"maiou": maiou, "thr": C.thr_from_maiou(maiou)}))
        return 0
    thrs = _parse_range(thr)
    check_positive(n_images, "--n_images")
    check_out_dir(out)
    if boxes == "synthetic":
        bx = C.synthetic_boxes(n_images, (375, 500), seed).tolist()
        sizes = [(375, 500)] * len(bx)
    else:
        if data is None:
            raise ValueError(f"boxes={boxes!r} needs data=<CUB root> for the image sizes")
        from PIL import Image

        from ..data.datasets import CUB200

        sets = [CUB200(data, split=s, split_mode="official") for s in ("train", "test")]
        ids = [str(r.id) for ds in sets for r in ds.records]
        recs = [r for ds in sets for r in ds.records]
        sizes = []
        for r in recs:
            with Image.open(r.image) as im:
                sizes.append((im.height, im.width))
        if boxes == "gt":
            bx = [r.boxes[0].tolist() for r in recs]
        else:
            table = C.read_box_json(boxes, ids, sizes=dict(zip(ids, sizes, strict=True)), clip=clip_boxes)
            bx = [table[i] for i in ids]
    curve = {t: C.localized_crop_maiou(bx, sizes, t, seed=seed) for t in thrs}
    rrc = _rrc_maiou(bx, sizes, seed)
    out = Path(out)
    tag = boxes if boxes in ("synthetic", "gt") else "file"
    res = {f"maiou/{tag}/thr{t:g}": v for t, v in curve.items()}
    res[f"maiou/{tag}/rrc"] = rrc
    res["meta"] = run_metadata({"boxes": boxes, "data": data, "thr": thrs, "n_images": len(bx), "seed": seed},
                               "maiou")
    atomic_write_text(out / "maiou_curve.json", strict_json(res))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    pt = sorted(C.PUBLISHED_MAIOU)
    ax.plot(pt, [C.PUBLISHED_MAIOU[t] for t in pt], "o-", label="published (read off the plot)")
    xs = np.linspace(0, 1, 101)
    ax.plot(xs, C.maiou_fit(xs), ":", label="fit 0.5 + thr^0.4 / 2")
    ax.plot(list(curve), list(curve.values()), "s--", label=f"measured ({boxes}, n={len(bx)})")
    ax.axhline(rrc, color="grey", lw=0.8, label=f"plain RandomResizedCrop ({rrc:.3f})")
    ax.set_xlabel("thr")
    ax.set_ylabel("maIoU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "maiou_curve.png", dpi=110)
    print(json.dumps({**{f"{t:g}": round(v, 4) for t, v in curve.items()}, "rrc": round(rrc, 4)}))
    return 0


def _rrc_maiou(bx: list, sizes: list, seed: int) -> float:
    """maIoU of torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) on the same boxes, one crop each."""
    import numpy as np
    import torch
    from torchvision.transforms import RandomResizedCrop

    from ..eval.boxes import maiou as mean_aiou

    torch.manual_seed(seed)
    crops = []
    for H, W in sizes:
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, H, W), [0.08, 1.0], [3 / 4, 4 / 3])
        crops.append([left, top, w, h])
    return mean_aiou(np.asarray(crops, np.float64), [np.asarray([b], np.float64) for b in bx], fmt="xywh")


@command("crops density-cache")
def density_cache(data: str = "synthetic", out: Path = Path("runs/density_cache.safetensors"),
                  backbone: str = "demo_vit", weights: str = "random", split: str = "all",
                  split_mode: str = "dinov2_consistent", n_images: int = 64, image_size: int = 64, block: int = -1,
                  size: str = "native", values: str = "logit", outlier: bool = True, batch_size: int = 32,
                  device: str = "cpu", seed: int = 0) -> int:
    """Precompute the patch-resolution density score maps (fp16, one safetensors file keyed by image id).

    Args:
        data: ``synthetic`` or a CUB-200-2011 root.
        out: the safetensors file.
        backbone: backbone name.
        weights: ``pretrained``, a tag, a local file, or ``random``.
        split: CUB split (``all`` = every image).
        split_mode: CUB split mode when split is not ``all``.
        n_images: synthetic scenes to render.
        image_size: side of the synthetic scenes.
        block: attention block.
        size: backbone input rule: ``native`` or ``short:S``.
        values: ``logit`` or ``prob``.
        outlier: replace each head's maximum by its mean.
        batch_size: images per forward.
        device: torch device.
        seed: seed of the synthetic scenes.
    """
    from ..backbones import load_backbone
    from ..data import crops as C

    images, ids, _, _ = _load_images(data, split, split_mode, n_images, image_size, seed)
    bb = load_backbone(backbone, weights=weights, device=device).eval()
    path = C.build_density_cache(bb, images, ids, out, block=block, size=size, values=values, outlier=outlier,
                                 batch_size=batch_size, device=device)
    print(json.dumps({"cache": str(path), "images": len(ids), "bytes": path.stat().st_size}))
    return 0
