"""``dinokit rasa fit`` and ``dinokit rasa apply`` (spec docs/methods/rasa.md).

Heavy imports (Lightning, torchvision, the backbone) happen inside the functions, so building the CLI stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import command, group

log = logging.getLogger(__name__)


group("rasa", "RASA: fit, apply, convert and inspect heads that remove absolute position from patch tokens")


def _crop_for_patch(crop_size: int, patch: int) -> int:
    """The multiple of the patch size nearest ``crop_size`` (518 -> 518 at p 14, 512 at p 16)."""
    return max(patch, round(crop_size / patch) * patch)


@command("rasa fit")
def fit(backbone: str = "dinov2_vitb14", weights: str = "pretrained", data: Path | None = None,
        train_split: str = "trainaug", val_data: Path | None = None, val_split: str = "val",
        synthetic: int = 0, synthetic_size: int = 64, out: Path = Path("runs/rasa"),
        crop_size: int = 518, crop_scale: tuple[float, float] = (0.25, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333), photometric: bool = True,
        normalize_std_typo: bool = False, shuffle: bool = True, val_size: int = 224, val_images: int | None = None,
        batch_size: int = 128, epochs: int = 5, lr: float = 2e-4, weight_decay: float = 0.0,
        stopping: str = "fixed", max_stages: int | None = None, min_stages: int = 1, rtol: float = 0.05,
        audit: bool = True, entropy: bool = True, overcluster: bool = True, overcluster_images: int = 160,
        num_workers: int = 4, accelerator: str = "auto",
        devices: int = 1, strategy: str = "auto", backbone_precision: str = "fp32", device: str | None = None,
        resume: bool = True, seed: int = 0) -> int:
    """Fit a RASA head stage by stage on a frozen backbone (one fresh position regressor per stage).

    Writes ``stage{t:02d}.pth`` after every committed stage (resumable after a kill), then ``rasa_head.pth``
    (upstream/Franca format), ``rasa_head.safetensors`` (native, with metadata), ``metrics.json`` and the per-stage
    curve ``curve.png`` / ``curve.json``.

    Args:
        backbone: short name or timm architecture of the frozen backbone.
        weights: "pretrained", a tag, a checkpoint file, or "random" (random weights give a meaningless head).
        data: training images: a dataset root (VOC-style, ...) or an image folder (labels unused).
        train_split: split of ``data`` used for training (VOC: trainaug).
        val_data: validation dataset root (default: ``data``).
        val_split: split of ``val_data`` used for per-stage validation.
        synthetic: instead of ``data``, train on this many synthetic scenes (validation: a quarter as many, >= 8).
        synthetic_size: side of the synthetic scenes in pixels.
        out: output directory.
        crop_size: RandomResizedCrop size; rounded to the nearest multiple of the patch size (518 -> 512 at p 16).
        crop_scale: RandomResizedCrop scale range.
        crop_ratio: RandomResizedCrop aspect-ratio range.
        photometric: colour jitter, grayscale and blur augmentations.
        normalize_std_typo: use upstream's training std 0.255 for blue (parity runs only).
        shuffle: shuffle training images (upstream's VOC loader did not).
        val_size: validation images are squash-resized to this size.
        val_images: use only the first N validation images (default: all).
        batch_size: images per optimiser step (drop_last).
        epochs: epochs per stage.
        lr: AdamW learning rate (cosine to 0 per step, restarted each stage).
        weight_decay: AdamW weight decay.
        stopping: "fixed" (exactly max_stages stages) or "chance" (stop when the fresh probe is within rtol of chance).
        max_stages: stage cap (default 9 for fixed, 22 for chance).
        min_stages: stages committed regardless of the stopping rule.
        rtol: relative tolerance of the chance rule (stop when MSE >= (1 - rtol) * chance).
        audit: train one extra, uncommitted probe on the final features and report it.
        entropy: report the spatial entropy se1 (K=100) of raw vs debiased validation tokens after each stage.
        overcluster: report overclustering mIoU (K = 500, 300, C) of raw vs debiased tokens after each stage (only
            when the validation set has masks).
        overcluster_images: number of validation images clustered.
        num_workers: DataLoader workers.
        accelerator: Lightning accelerator (auto, cpu, gpu).
        devices: Lightning devices per node.
        strategy: Lightning strategy (auto, ddp, ...).
        backbone_precision: fp32 or bf16 (autocast) for the frozen backbone; the probe and loss stay fp32.
        device: device of the backbone for validation (default: cuda if available, else cpu).
        resume: continue from the last finished stage found in ``out``.
        seed: the probe of stage t is initialised from seed + t (published default 400).
    """
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    import torch

    from ..backbones import load_backbone
    from ..io import atomic_write_text, run_metadata
    from ..methods.rasa import (
        ImagesOnly,
        entropy_stage_metrics,
        overcluster_stage_metrics,
        rasa_train_transform,
        rasa_val_transform,
        stage_curve,
        val_masks,
    )
    from ..methods.rasa.lightning import fit_rasa_backbone

    if data is None and synthetic <= 0:
        raise ValueError("no training data: pass --data DATASET_ROOT_OR_FOLDER or --synthetic N")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the backbone first: offline without weights this fails at once with WeightsUnavailableError
    bb = load_backbone(backbone, weights, device=dev).eval()
    crop = _crop_for_patch(crop_size, bb.patch_size)
    vsize = _crop_for_patch(val_size, bb.patch_size)
    if crop != crop_size or vsize != val_size:
        log.info("crop %d -> %d, val size %d -> %d (multiples of the patch size %d)", crop_size, crop, val_size,
                 vsize, bb.patch_size)
    ttf = rasa_train_transform(crop, crop_scale, crop_ratio, bb.mean, bb.std, photometric=photometric,
                               normalize_std_typo=normalize_std_typo)
    vtf = rasa_val_transform(vsize, bb.mean, bb.std)
    if data is not None:
        from ..data.datasets import open_dataset

        train_src = open_dataset(data, split=train_split)
        val_src = open_dataset(val_data or data, split=val_split)
        train_name = f"{data}:{train_split}"
    else:
        from ..data.synthetic import SyntheticScenes, num_seg_classes

        train_src = SyntheticScenes(synthetic, (synthetic_size, synthetic_size), seed=seed)
        val_src = SyntheticScenes(max(8, synthetic // 4), (synthetic_size, synthetic_size), seed=seed + 1)
        train_name = f"synthetic:{synthetic}x{synthetic_size}"
        val_src.num_classes, val_src.ignore_index = num_seg_classes(), 255
    if val_images is not None:
        from torch.utils.data import Subset

        val_src = Subset(val_src, range(min(val_images, len(val_src))))
    train_ds, val_ds = ImagesOnly(train_src, ttf), ImagesOnly(val_src, vtf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def report(rec) -> None:
        log.warning("RASA stage %d: fresh-probe val MSE %.6f vs chance %.6f (R2_pos %.4f)%s", rec.stage, rec.mse,
                    rec.chance, rec.r2, "".join(f", {k} {v:.4f}" for k, v in rec.metrics.items() if "cos" in k))
        print(f"stage {rec.stage}: mse {rec.mse:.6f} chance {rec.chance:.6f} r2 {rec.r2:.4f} "
              + " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in rec.metrics.items() if "cos" in k), flush=True)

    hooks = []
    base = getattr(val_src, "dataset", val_src)
    dkey = getattr(base, "key", None) or ("synthetic" if data is None else "val")  # key grammar: <dataset>/feat-...
    if entropy:
        hooks.append(entropy_stage_metrics(vsize, dataset=dkey))
    masks = val_masks(val_src, overcluster_images, vsize) if overcluster else None
    if masks is not None:
        nc = int(getattr(base, "num_classes", 0) or 0)
        if nc > 0:
            hooks.append(overcluster_stage_metrics(masks, nc, vsize, dataset=dkey,
                                                   ignore_index=getattr(base, "ignore_index", 255)))

    def stage_metrics(h, batches):
        out = {}
        for hook in hooks:
            out.update(hook(h, batches))
        return out

    res = fit_rasa_backbone(
        bb, train_ds, val_ds, batch_size=batch_size, epochs=epochs, lr=lr, weight_decay=weight_decay,
        stopping=stopping, max_stages=max_stages, min_stages=min_stages, rtol=rtol, audit=audit, seed=seed,
        out_dir=out, resume=resume, num_workers=num_workers, shuffle=shuffle, accelerator=accelerator,
        devices=devices, strategy=strategy, backbone_precision=backbone_precision,
        stage_metrics=stage_metrics if hooks else None, on_record=report)
    metrics = res.summary()
    grid = vsize // bb.patch_size
    if res.head.n_stages:
        committed = [r.mse for r in res.records if r.committed]
        res.head.save(out / "rasa_head.pth")
        res.head.save(out / "rasa_head.safetensors", format="native", metadata={
            "backbone": backbone, "train_grid": f"{crop // bb.patch_size}x{crop // bb.patch_size}",
            "train_data": train_name, "stage_val_mse": committed, "chance": res.records[0].chance,
            "stop_reason": res.stop_reason, "val_grid": f"{grid}x{grid}", "weights": json.dumps(bb.weights_info)})
    stage_curve(res.records, out / "curve.png", out / "curve.json", title=f"RASA on {backbone} ({weights})")
    payload = {**metrics, "meta": run_metadata(config, "rasa_fit", bb.weights_info)}
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=1, default=str))
    print(f"RASA: {res.head.n_stages} stages ({res.stop_reason}); wrote {out}/rasa_head.pth, metrics.json, curve.png")
    return 0


@command("rasa apply")
def apply(head: Path, features: Path, out: Path, mode: str = "auto", overwrite: bool = False, seed: int = 0) -> int:
    """Debias feature shards written by ``dinokit features`` with a RASA head (patch tokens only).

    Every ``shard-*.safetensors`` of ``features`` is read, its ``patch`` tensor (N, h, w, D) is debiased with the
    folded head (CLS and registers unchanged, dtype kept) and written atomically under the same name in ``out``.
    Shards already converted with the same head are skipped (resumable).

    Args:
        head: RASA head file (upstream .pth, Lightning checkpoint or native .safetensors).
        features: directory of feature shards (output of ``dinokit features``).
        out: output directory (must differ from ``features``).
        mode: folded operator: auto, lowrank or dense.
        overwrite: redo shards that already exist in ``out``.
        seed: unused (the transform is deterministic); recorded for provenance.
    """
    from ..backbones.shards import read_shard, shard_is_complete, write_shard
    from ..methods.rasa import RASATransform, load_rasa_head

    features, out, head = Path(features), Path(out), Path(head)
    if not features.is_dir():
        raise FileNotFoundError(f"--features {features} is not a directory; run `dinokit features` first")
    if out.resolve() == features.resolve():
        raise ValueError(f"--out {out} equals --features; write the debiased shards to another directory")
    files = sorted(features.glob("shard-*.safetensors"))
    if not files:
        raise ValueError(f"{features} holds no feature shards (shard-*.safetensors); run `dinokit features` first")
    h = load_rasa_head(head)
    tr = RASATransform(h, mode)
    tag = {"rasa": str(head), "rasa_stages": h.n_stages, "rasa_embed_dim": h.embed_dim}
    out.mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    for f in files:
        dst = out / f.name
        if not overwrite and shard_is_complete(dst):
            _, _, m = read_shard(dst)
            if m.get("feature_transform") == tag:
                skipped += 1
                continue
        tensors, ids, meta = read_shard(f)
        if "patch" not in tensors:
            raise ValueError(f"{f} has no 'patch' tensor; it is not a dense feature shard")
        patch = tensors["patch"]
        if patch.shape[-1] != h.embed_dim:
            raise ValueError(f"{f}: patch tokens have D = {patch.shape[-1]} but the head {head} has D = "
                             f"{h.embed_dim}; use a head fitted on the backbone that made these features")
        if meta.get("feature_transform"):
            log.warning("%s already carries a feature transform %s; applying RASA on top", f,
                        meta["feature_transform"])
        tensors["patch"] = tr(patch)
        write_shard(dst, tensors, ids, {**meta, "feature_transform": tag})
        done += 1
    from ..io import atomic_write_bytes, atomic_write_text

    for extra in ("manifest.json", "bad_files.txt"):
        if (features / extra).is_file():
            atomic_write_bytes(out / extra, (features / extra).read_bytes())

    atomic_write_text(out / "rasa_apply.json", json.dumps({**tag, "source": str(features), "shards": len(files),
                                                           "mode": tr.op.resolved_mode, "seed": seed}, indent=1))
    print(f"rasa apply: {done} shards debiased, {skipped} already done -> {out}")
    return 0


@command("rasa convert")
def convert(head: Path, out: Path, format: str = "native", seed: int = 0) -> int:
    """Convert a RASA head between the upstream (Franca ``torch.save``) and native (safetensors) formats.

    Args:
        head: input head file (upstream .pth, Lightning checkpoint or native .safetensors).
        out: output file.
        format: output format: native or upstream.
        seed: unused; recorded for provenance.
    """
    from ..methods.rasa import load_rasa_head

    h = load_rasa_head(head)
    h.save(out, format=format, metadata={"converted_from": str(head)} if format == "native" else None)
    print(f"rasa convert: {h.n_stages} stages, D = {h.embed_dim} -> {out} ({format})")
    return 0


@command("rasa inspect")
def inspect(head: Path, out: Path | None = None, seed: int = 0) -> int:
    """Describe a RASA head: T, D, principal angles between stage subspaces, asymmetry and non-idempotence of the
    composite operator L, and the per-stage validation MSE stored in native metadata.

    Args:
        head: head file (upstream .pth, Lightning checkpoint or native .safetensors).
        out: optional JSON file for the numbers.
        seed: unused; recorded for provenance.
    """
    import torch

    from ..io import atomic_write_text
    from ..methods.rasa import load_rasa_head

    h = load_rasa_head(head)
    info = inspect_head(h)
    for k, v in info.items():
        print(f"{k}: {v}")
    if out is not None:
        atomic_write_text(Path(out), json.dumps({**info, "meta": {"head": str(head), "torch": torch.__version__}},
                                                indent=1))
    return 0


def inspect_head(h) -> dict[str, object]:
    """The numbers of :func:`inspect` for a :class:`~dinokit.methods.rasa.RASAHead`."""
    import torch

    bases = h.bases64()
    L = h.fold().L64
    angles = {}
    for s in range(len(bases)):
        for t in range(s + 1, len(bases)):
            if bases[s].shape[1] and bases[t].shape[1]:
                sv = torch.linalg.svdvals(bases[s].T @ bases[t]).clamp(-1, 1)
                angles[f"{s + 1}-{t + 1}"] = [round(float(a), 3) for a in torch.rad2deg(torch.arccos(sv))]
    info: dict[str, object] = {"n_stages": h.n_stages, "embed_dim": h.embed_dim,
                               "stage_ranks": [int(U.shape[1]) for U in bases],
                               "norm_L_minus_LT": float((L - L.T).norm()), "norm_L2_minus_L": float((L @ L - L).norm()),
                               "principal_angles_deg": angles}
    for k in ("stage_val_mse", "chance", "stop_reason", "backbone", "train_grid"):
        if k in h.meta:
            info[k] = h.meta[k]
    return info
