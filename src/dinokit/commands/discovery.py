"""The label-free evaluations: ``dinokit discover`` (LOST / TokenCut / attention boxes + CorLoc), ``dinokit eval
knn`` (DINO's weighted k-NN) and ``dinokit eval unsup-seg`` (CBFE + community detection).

See docs/eval/discovery.md, docs/eval/knn.md and docs/eval/unsup_seg.md. Result files are flat JSON dicts written
atomically (``allow_nan=False``) with the ``meta/*`` strings and provenance block of the other ``dinokit eval``
commands. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import command


def _write(out: Path, task: str, metrics: dict, meta: dict) -> Path:
    from ..io import atomic_write_text

    path = Path(out) / f"{task}.json"
    atomic_write_text(path, json.dumps({**metrics, **meta}, indent=1, default=str, allow_nan=False))
    print(f"{task}: wrote {path}")
    for k, v in metrics.items():
        print(f"  {k} = {v:.4f}" if isinstance(v, float) else f"  {k} = {v}")
    return path


def _backbone(backbone: str, weights: str, device: str, rasa: Path | None = None, seed: int = 0):
    """The backbone in eval mode; ``seed`` seeds torch first (random weights are reproducible)."""
    import torch

    from ..backbones import load_backbone

    torch.manual_seed(seed)
    return load_backbone(backbone, weights, device=device, rasa=str(rasa) if rasa else None).eval()


def _record(bb) -> dict:
    return {"name": bb.name, "patch_size": bb.patch_size, "weights": bb.weights_info}


def _choice(name: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"--{name} {value!r}: choose one of {', '.join(options)}")


# ------------------------------------------------------------------------------------------- discover


@command("discover")
def discover(data: str = "synthetic", out: Path = Path("runs/discover"), method: str = "lost",
             backbone: str = "dino_vits16", weights: str = "pretrained", rasa: Path | None = None,
             split: str = "trainval", size: str = "native", k_patches: int = 100, tau: float = 0.2, eps: float = 1e-5,
             binary_graph: bool = True, eig_dtype: str = "float64", hard: str = "keep", empty_gt: str = "miss",
             iou_mode: str = "standard", dataset_key: str | None = None, n_images: int | None = None,
             synthetic_n: int = 16, image_size: int = 96, batch_size: int = 8, device: str = "cpu",
             n_overlays: int = 8, seed: int = 0) -> int:
    """Single-object discovery: one box per image by LOST, TokenCut or CLS attention, and CorLoc when gt boxes exist.

    Args:
        data: a VOC07/VOC12 detection root (Annotations + ImageSets/Main), a COCO20k root, or synthetic.
        out: output folder: boxes_<method>.json ({id: [x, y, w, h]}, the format of `dinokit boxes`) with its
            .meta.json, corloc_<method>.json and figures/discover_<method>.png.
        method: lost, tokencut or attention (the `dinokit boxes` pseudo-box rule).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        rasa: a RASA head; it transforms final features, which none of these methods reads, so it is refused.
        split: detection split (trainval for the CorLoc tables).
        size: native (the protocol: no resize, zero-pad to multiples of p) or short:S.
        k_patches: LOST's k lowest-degree patches.
        tau: TokenCut's similarity threshold.
        eps: TokenCut's weight for the edges below tau.
        binary_graph: TokenCut's binary graph (false keeps the similarities above tau).
        eig_dtype: float64 or float32 for TokenCut's eigensolver.
        hard: keep (count difficult/truncated gt boxes) or drop (LOST's --no_hard).
        empty_gt: images without gt boxes count as misses (miss) or are skipped (skip).
        iou_mode: standard or lost (LOST's epsilon formula).
        dataset_key: dataset name in the keys (default: voc07 / voc12 / coco20k from the loader).
        n_images: only the first n images.
        synthetic_n: number of synthetic scenes (data=synthetic).
        image_size: side of the synthetic scenes.
        batch_size: images per backbone forward (images are grouped by padded size).
        device: torch device.
        n_overlays: images drawn in the figure.
        seed: seed of the synthetic scenes (the methods are deterministic).
    """
    import numpy as np
    import torch

    from ..data.crops import write_box_json
    from ..data.detection import open_detection
    from ..eval.boxes import corloc, xywh_to_xyxy
    from ..eval.discovery import discover_boxes
    from ..viz.figures import draw_box_overlays

    t0 = time.perf_counter()
    _choice("method", method, ("lost", "tokencut", "attention"))
    _choice("hard", hard, ("keep", "drop"))
    _choice("empty_gt", empty_gt, ("miss", "skip"))
    _choice("iou_mode", iou_mode, ("standard", "lost"))
    _choice("eig_dtype", eig_dtype, ("float64", "float32"))
    if rasa is not None:
        raise ValueError("--rasa: a RASA head transforms the final patch features, but LOST/TokenCut read the last "
                         "block's keys and the attention method its CLS attention; drop --rasa")
    kw = {"n": synthetic_n, "size": (image_size, image_size), "seed": seed} if data.startswith("synthetic") else {}
    ds = open_detection(data, split, **kw)
    n = len(ds) if n_images is None else min(len(ds), n_images)
    if n == 0:
        raise ValueError(f"split {split!r} of {data} is empty")
    bb = _backbone(backbone, weights, device, seed=seed)
    window = max(1, 8 * batch_size)  # images prepared at once (all sizes of a window are bucketed together)
    ids, gts, hards, boxes, shown, outside = [], [], [], [], [], []
    has_gt = True
    for s in range(0, n, window):
        items = [ds[i] for i in range(s, min(n, s + window))]
        imgs = [np.asarray(it["image"]) for it in items]
        if method == "attention":  # the CLS-attention pseudo-boxes of `dinokit boxes`, default rule
            from ..data.crops import BoxConfig, pseudo_boxes

            tmp_ids = [str(i) for i in range(len(imgs))]
            bx, degenerate = pseudo_boxes(bb, imgs, tmp_ids, BoxConfig(batch_size=batch_size), device=device)
            boxes.append(np.asarray([[x, y, x + w, y + h] for x, y, w, h in (bx[i] for i in tmp_ids)], np.float64))
            outside += [s + int(i) for i in degenerate]
        else:
            run = discover_boxes(bb, imgs, method, batch_size, device, size, k_patches, tau, eps, binary_graph,
                                 getattr(torch, eig_dtype), keep_maps=0)
            boxes.append(run.boxes)
            outside += [s + i for i in run.seed_outside]
        for it, im in zip(items, imgs):
            ids.append(str(it["id"]))
            if "boxes" not in it:
                has_gt = False
            g = np.asarray(it.get("boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
            gts.append(g)
            hards.append(np.asarray(it.get("box_hard", np.zeros(len(g), bool)), bool))
            if len(shown) < n_overlays:
                shown.append(im)
    xyxy = np.concatenate(boxes)
    xywh = {i: [round(b[0]), round(b[1]), round(b[2] - b[0]), round(b[3] - b[1])] for i, b in zip(ids, xyxy)}
    out = Path(out)
    key = dataset_key or getattr(ds, "key", "dataset")
    cfg = {"data": str(data), "method": method, "backbone": backbone, "weights": weights, "split": split,
           "size": size, "k_patches": k_patches, "tau": tau, "eps": eps, "binary_graph": binary_graph,
           "eig_dtype": eig_dtype, "hard": hard, "empty_gt": empty_gt, "iou_mode": iou_mode, "n_images": n,
           "batch_size": batch_size, "seed": seed}
    from ..io import run_metadata

    write_box_json(out / f"boxes_{method}.json", xywh,
                   {**run_metadata(cfg, f"discover/{method}", bb.weights_info), "count": len(xywh),
                    "seed_outside_ids": [ids[i] for i in outside]})
    if n_overlays > 0 and shown:
        draw_box_overlays(out / "figures" / f"discover_{method}.png", shown, ids[:len(shown)], xywh,
                          [g for g in gts[:len(shown)]])
    if not has_gt:
        print(f"discover: wrote {out / f'boxes_{method}.json'} ({n} boxes); the dataset has no gt boxes: no CorLoc")
        return 0
    cl = corloc(list(xyxy), [xywh_to_xyxy(g) if len(g) else g for g in gts], hard=hards, hard_mode=hard,
                empty_gt=empty_gt, iou_mode=iou_mode)
    base = f"{key}-{split}/corloc/lost/{method}"
    metrics = {f"{base}/{m}": v for m, v in cl.items()}
    from .evaluation import _meta

    cfg["seconds"] = time.perf_counter() - t0
    _write(out, f"corloc_{method}", metrics, _meta("discover", "lost", cfg, _record(bb),
                                                   {"n_seed_outside": len(outside), "seeds": [seed]}))
    return 0


# ------------------------------------------------------------------------------------------- k-NN


class _Labelled:
    """(uint8 (3, S, S) tensor, label) items: Resize(shorter side, bicubic) + CenterCrop(S) of a dataset's images."""

    def __init__(self, ds, labels: list[int], resize: int, size: int):
        from torchvision.transforms import v2

        self.ds, self.labels = ds, labels
        self.tf = v2.Compose([v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC),
                              v2.CenterCrop(size), v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.ds[i]["image"]
        if img is None:
            raise ValueError(f"unreadable image {self.ds.records[i].image}")
        img = img if isinstance(img, Image.Image) else Image.fromarray(img)
        return self.tf(img.convert("RGB")), self.labels[i]


def _knn_split(data: str, split: str, split_mode: str, synthetic_n: int, image_size: int,
               classes: list[str] | None = None, seed: int = 0):
    """(dataset, labels, class names, key) of a labelled split: synthetic, CUB, or an ImageFolder of class folders."""
    from ..data.datasets import ImageFolder, detect_layout, open_dataset

    if data in ("synthetic", "synthetic-fine"):
        ds = open_dataset(data, split, n=synthetic_n, size=(image_size, image_size), seed=seed)
        return ds, [int(ds[i]["label"]) for i in range(len(ds))], list(ds.image_class_names), "synthetic"
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: not synthetic and no such folder")
    if detect_layout(root) == "cub":
        ds = open_dataset(root, split, split_mode=split_mode)
        return ds, [int(r.label) for r in ds.records], list(ds.class_names), "cub"
    sub = root / split
    if not sub.is_dir():
        raise FileNotFoundError(f"--data {root}: expected class folders under {sub} (ImageFolder layout "
                                f"<root>/<split>/<class>/<image>) or a CUB-200-2011 root")
    ds = ImageFolder(sub, on_bad="raise")
    names = classes or sorted({i.split("/")[0] for i in ds.ids if "/" in i})
    index = {c: k for k, c in enumerate(names)}
    flat = [i for i in ds.ids if "/" not in i or i.split("/")[0] not in index]
    if flat:
        raise ValueError(f"{sub}: {len(flat)} image(s) outside the class folders of the train split "
                         f"(first: {flat[:3]}); every image must sit in <class>/ with a class seen in training")
    return ds, [index[i.split("/")[0]] for i in ds.ids], names, root.name.lower()


@command("eval knn")
def knn(data: str = "synthetic", out: Path = Path("runs/eval"), backbone: str = "dinov2_vits14",
        weights: str = "pretrained", rasa: Path | None = None, train_split: str = "train", split: str = "val",
        split_mode: str = "official", size: int = 224, resize: int | None = None, feature: str = "cls",
        ks: list[int] | None = None, temperature: float = 0.07, dataset_key: str | None = None,
        synthetic_n: int = 64, image_size: int = 96, batch_size: int = 64, num_workers: int = 0,
        device: str = "cpu", seed: int = 0) -> int:
    """Weighted k-NN classification of global features (DINO's protocol): top-1 / top-5 for several k in one pass.

    Args:
        data: synthetic, synthetic-fine, a CUB-200-2011 root, or an ImageFolder root (<root>/<split>/<class>/*).
        out: output folder (knn.json).
        backbone: backbone short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        rasa: optional RASA head applied to the features.
        train_split: the memory split.
        split: the query split (CUB: test or val).
        split_mode: CUB split mode (official, dinov2, random70).
        size: centre-crop side S (224).
        resize: shorter side before the crop (default round(S * 256 / 224), bicubic).
        feature: cls, avgpool or cls+avgpool (L2-normalised).
        ks: neighbour counts (default 10, 20, 100, 200; each at most the memory size).
        temperature: T of the vote weights exp(sim / T).
        dataset_key: dataset name in the keys (default: synthetic, cub, or the folder name).
        synthetic_n: scenes per split (synthetic data).
        image_size: side of the synthetic scenes.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images.
        device: torch device.
        seed: seed of the synthetic scenes (the protocol is deterministic).
    """
    import torch
    from torch.utils.data import DataLoader

    from ..eval.knn import FEATURES, KS, global_features, knn_classify

    t0 = time.perf_counter()
    _choice("feature", feature, FEATURES)
    ks = list(ks) if ks is not None else list(KS)
    resize = resize or round(size * 256 / 224)
    tr_ds, tr_y, names, key = _knn_split(data, train_split, split_mode, synthetic_n, image_size, seed=seed)
    te_ds, te_y, _, _ = _knn_split(data, split, split_mode, synthetic_n, image_size,
                                   None if data.startswith("synthetic") else names, seed)
    if max(ks) > len(tr_y):
        raise ValueError(f"--ks {ks}: k = {max(ks)} exceeds the {len(tr_y)} train images; pass smaller --ks")
    bb = _backbone(backbone, weights, device, rasa, seed)
    mean = torch.tensor(bb.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bb.std, device=device).view(1, 3, 1, 1)

    def embed(ds, labels):
        feats = []
        loader = DataLoader(_Labelled(ds, labels, resize, size), batch_size=batch_size, num_workers=num_workers)
        with torch.no_grad():
            for x, _ in loader:
                x = (x.to(device).float() / 255.0 - mean) / std
                feats.append(global_features(bb.forward_features(x), feature).cpu())
        return torch.cat(feats)

    res = knn_classify(embed(tr_ds, tr_y), torch.tensor(tr_y), embed(te_ds, te_y), torch.tensor(te_y),
                       num_classes=len(names), ks=ks, temperature=temperature, device=device)
    base = f"{dataset_key or key}/knn/{feature}/in{size}"
    metrics = {f"{base}/{k.split('/')[0]}/T{temperature:g}/{k.split('/')[1]}": v for k, v in res.metrics.items()}
    from .evaluation import _meta

    cfg = {"data": str(data), "backbone": backbone, "weights": weights, "rasa": str(rasa) if rasa else None,
           "train_split": train_split, "split": split, "split_mode": split_mode, "size": size, "resize": resize,
           "feature": feature, "ks": ks, "temperature": temperature, "n_train": len(tr_y), "n_test": len(te_y),
           "seed": seed, "seconds": time.perf_counter() - t0}
    _write(out, "knn", metrics, _meta("knn", "dino", cfg, _record(bb), {"n_classes": len(names), "seeds": [seed]}))
    return 0


# ------------------------------------------------------------------------------------------- unsup-seg


def _read_fg_mask(folder: Path, image_id: str):
    import numpy as np
    from PIL import Image

    p = Path(folder) / f"{image_id}.png"
    if not p.is_file():
        raise FileNotFoundError(f"--fg_masks {folder}: no mask {p} for image {image_id!r} (one PNG per image id, "
                                "non-zero = foreground)")
    with Image.open(p) as im:
        return np.asarray(im.convert("L")) > 0


@command("eval unsup-seg")
def unsup_seg(data: str = "synthetic", out: Path = Path("runs/eval"), backbone: str = "dino_vits16",
              weights: str = "pretrained", rasa: Path | None = None, train_split: str = "train", split: str = "val",
              size: int = 448, fg_source: str = "attention", fg_masks: Path | None = None,
              k_community: int | None = None, markov_time: float | None = None,
              weight_threshold: float | None = None, n_trials: int = 300, search_seed: int = 1000,
              k_fg: int = 200, cd_runs: int = 10, cbfe_seeds: list[int] | None = None, niter: int = 100,
              nredo: int = 5, n_images: int | None = None, token_fp16: bool = False, workdir: Path | None = None,
              synthetic_n: int = 32, batch_size: int = 16, device: str = "cpu", n_figures: int = 4,
              seed: int = 0) -> int:
    """Fully unsupervised semantic segmentation, protocol cbfe-cd: CBFE foreground + community detection.

    Args:
        data: a dataset root with a background class (VOC12: train + val) or synthetic.
        out: output folder (unsup_seg.json, figures/).
        backbone: backbone short name or timm architecture (attention masks need a ViT).
        weights: "pretrained", a tag, a checkpoint file, or "random".
        rasa: optional RASA head applied to the patch features (the attention masks are unaffected).
        train_split: the split that fixes the CBFE threshold and the searched hyper-parameters.
        split: the evaluation split.
        size: squash size S of both splits (448).
        fg_source: attention (the backbone's last-block CLS attention) or masks (read from --fg_masks).
        fg_masks: folder with one PNG per image id, non-zero = foreground (fg_source masks).
        k_community: clusters of the foreground k-means (given with markov_time and weight_threshold, else searched).
        markov_time: Infomap's Markov time.
        weight_threshold: smallest co-occurrence weight of an edge.
        n_trials: Optuna TPE trials of the search.
        search_seed: seed of the TPE sampler.
        k_fg: clusters of the CBFE k-means.
        cd_runs: Infomap runs (run r uses seed r + 1).
        cbfe_seeds: k-means seeds of the CBFE score (default 0..4).
        niter: k-means iterations.
        nredo: k-means restarts.
        n_images: only the first n images of each split.
        token_fp16: store the token shards in fp16 on disk.
        workdir: folder for the temporary shards and point memmaps (default: the system temp folder).
        synthetic_n: scenes per split (synthetic data).
        batch_size: images per forward pass.
        device: torch device.
        n_figures: val images drawn in the figure.
        seed: recorded seed (synthetic scenes; every stage has its own fixed seed).
    """
    import numpy as np
    import torch

    from ..data.datasets import open_dataset
    from ..data.transforms import SegTransform, to_tensor_batch
    from ..eval.unsup_seg import UnsupSegConfig, UnsupSegEvaluator, noisy_foreground, require
    from ..viz.figures import save_label_grid

    t0 = time.perf_counter()
    _choice("fg_source", fg_source, ("attention", "masks"))
    if (fg_source == "masks") != (fg_masks is not None):
        raise ValueError("--fg_masks DIR goes with --fg_source masks (and only with it)")
    given = [v is not None for v in (k_community, markov_time, weight_threshold)]
    if any(given) and not all(given):
        raise ValueError("give all of --k_community, --markov_time and --weight_threshold, or none (Optuna search)")
    for mod in ("infomap", "skimage") + (() if all(given) else ("optuna",)):
        require(mod)
    cfg = UnsupSegConfig(k_fg=k_fg, cd_runs=cd_runs, niter=niter, nredo=nredo,
                         cbfe_seeds=tuple(cbfe_seeds) if cbfe_seeds is not None else (0, 1, 2, 3, 4),
                         token_dtype="float16" if token_fp16 else "float32")
    kw = {"n": synthetic_n, "size": (size, size), "seed": seed} if data.startswith("synthetic") else {}
    dsets = {s: open_dataset(data, sp, **kw) for s, sp in (("train", train_split), ("val", split))}
    bb = _backbone(backbone, weights, device, rasa, seed)
    if size % bb.patch_size:
        raise ValueError(f"--size {size} is not a multiple of the patch size {bb.patch_size} of {bb.name}")
    ds0 = dsets["val"]
    tf = SegTransform(resize=(size, size))
    shown: list = []
    with UnsupSegEvaluator(int(ds0.num_classes), cfg, int(ds0.ignore_index), workdir) as ev:
        for name, ds in dsets.items():
            n = len(ds) if n_images is None else min(len(ds), n_images)
            if n == 0:
                raise ValueError(f"split {name} of {data} is empty")
            for s in range(0, n, batch_size):
                items = [ds[i] for i in range(s, min(n, s + batch_size))]
                if any(it.get("mask") is None for it in items):
                    raise ValueError(f"{data}: split {name} has images without masks; this protocol needs labels")
                t = [tf(it) for it in items]
                imgs = [np.asarray(x["image"], np.uint8) for x in t]
                x = to_tensor_batch(imgs, bb.mean, bb.std, device)
                with torch.no_grad():
                    if fg_source == "attention":
                        feats, attn = bb(x, attention_block=-1)
                        fg = noisy_foreground(attn.cls)
                    else:
                        feats = bb.forward_features(x)
                        fg = torch.from_numpy(np.stack([_read_fg_mask(fg_masks, str(it["id"])) for it in items]))
                ev.add(name, feats.patch, fg, torch.from_numpy(np.stack([x["mask"] for x in t])))
                if name == "val" and len(shown) < n_figures:
                    shown += imgs[:n_figures - len(shown)]
        res = ev.run(k_community, markov_time, weight_threshold, n_trials=n_trials, search_seed=search_seed,
                     n_examples=len(shown))
    k = res.meta["k_community"]
    key = getattr(ds0, "key", "dataset")
    base = f"{key}/unsup_seg/cbfe-cd/in{size}/k{k}"
    metrics = {f"{base}/{m}": float(v) for m, v in res.metrics.items()}
    if shown:
        ex = res.examples
        save_label_grid(Path(out) / "figures" / "unsup_seg_masks.png", shown,
                        {"ground truth": ex["gt"], "noisy fg": ex["noisy_fg"].astype(np.int64),
                         "CBFE fg": ex["cbfe_fg"].astype(np.int64), f"k{k} clusters": ex["clusters"],
                         "communities": ex["communities"]}, int(ds0.ignore_index))
    from .evaluation import _meta

    conf = {"data": str(data), "backbone": backbone, "weights": weights, "rasa": str(rasa) if rasa else None,
            "train_split": train_split, "split": split, "size": size, "fg_source": fg_source,
            "fg_masks": str(fg_masks) if fg_masks else None, "k_fg": k_fg, "cd_runs": cd_runs,
            "cbfe_seeds": list(cfg.cbfe_seeds), "niter": niter, "nredo": nredo, "n_trials": n_trials,
            "search_seed": search_seed, "n_images": n_images, "seed": seed, "cd_miou_per_run": res.per_run,
            "search": res.search, "seconds": time.perf_counter() - t0}
    _write(out, "unsup_seg", metrics, _meta("unsup_seg", "cbfe-cd", conf, _record(bb),
                                            {**res.meta, "seeds": [cfg.cluster_seed, *cfg.cbfe_seeds]}))
    return 0
