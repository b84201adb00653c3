"""``dinokit neco fit`` / ``dinokit neco export``.

The maths is in :mod:`dinokit.methods.neco` and the Lightning module in :mod:`dinokit.methods.neco.lightning`; this
module wires data, the Lightning ``Trainer`` (DDP, mixed precision, checkpoints) and the export. The library is
imported inside the commands so that the CLI stays fast to start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import command, group

log = logging.getLogger(__name__)
group("neco", "NeCo dense post-training by patch-neighbour consistency, and its export")


# ------------------------------------------------------------------------------------------- data
def build_dataset(data: str, views, seed: int, synthetic_images: int = 256, synthetic_size: int = 96):
    """``synthetic`` (in-memory synthetic scenes) or any path / ``key:path`` that ``open_dataset`` reads."""
    from ..methods.neco import NeCoDataset

    if data == "synthetic":
        from ..data.synthetic import SyntheticScenes

        base = SyntheticScenes(synthetic_images, (synthetic_size, synthetic_size), seed=seed)
    else:
        from ..data.datasets import open_dataset

        path = Path(data.partition(":")[2] if ":" in data and not Path(data).exists() else data)
        if not path.exists():
            raise FileNotFoundError(f"neco fit: data={data!r} does not exist; pass an image folder, a dataset root "
                                    "(VOC/COCO/ADE20K layouts) or 'synthetic'")
        base = open_dataset(data, split="train")
    return NeCoDataset(base, views)


def build_neco(backbone: str, weights: str, cfg, drop_path_rate: float, pos_interp: str, size_policy: str,
               world_size: int = 1, rank: int = 0, seed: int = 0, model_kwargs: dict | None = None,
               drop_registers: bool = False):
    """Student (drop-path ``drop_path_rate``) + teacher (drop-path 0, same weights) + heads."""
    from ..backbones import load_backbone
    from ..methods.neco import NeCo

    kw = dict(pos_interp=pos_interp, size_policy=size_policy, model_kwargs=model_kwargs)
    if drop_registers:
        kw["drop_registers"] = True
    student = load_backbone(backbone, weights=weights, drop_path_rate=drop_path_rate, **kw)
    teacher = load_backbone(backbone, weights=weights, drop_path_rate=0.0, **kw) if cfg.use_teacher else None
    return NeCo(student, teacher, cfg, world_size=world_size, rank=rank, seed=seed)


# ------------------------------------------------------------------------------------------- commands
@command("neco fit")
def fit(out: Path = Path("runs/neco"), backbone: str = "dinov2_vits14", weights: str = "pretrained",
        drop_registers: bool = False,
        data: str = "synthetic", synthetic_images: int = 256, synthetic_size: int = 96,
        epochs: int = 25, max_steps: int = -1, batch_size: int = 64, num_workers: int = 4,
        lr_backbone: float = 1e-5, lr_head: float = 1e-4, final_lr: float = 0.0, lr_scaling: str = "none",
        weight_decay: float = 0.04, weight_decay_end: float = 0.5, grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1, drop_path_rate: float = 0.1, pos_interp: str = "official",
        size_policy: str = "crop", crops: tuple[int, int] = (2, 4), sizes: tuple[int, int] = (518, 98),
        scale_min: tuple[float, float] = (0.25, 0.05), scale_max: tuple[float, float] = (1.0, 0.25),
        min_intersection: float = 0.01, jitter_strength: float = 1.0, blur_strength: float = 1.0,
        max_resample: int = 100, head_layers: int = 3, head_hidden: int = 2048, head_dim: int = 256,
        teacher_head_init: str = "random", use_teacher: bool = True, roi_size: int = 7,
        student_steepness: float = 100.0, teacher_steepness: float = 100.0, sort_net: str = "bitonic",
        sim: str = "cosine", reference_source: str = "queue", queue_length: int = 8192, loss_mask: str = "all",
        momentum_start: float = 0.9995, momentum_end: float = 1.0, accelerator: str = "auto",
        devices: int | str = "auto", num_nodes: int = 1, strategy: str = "auto", precision: str | None = None,
        resume: Path | None = None, checkpoint_every: int = 0, seed: int = 400) -> int:
    """NeCo dense post-training of a backbone (see docs/methods/neco.md): checkpoints, the student export, a summary.

    Args:
        out: run folder (checkpoints/, student.safetensors, fit.json).
        backbone: dinokit backbone name (e.g. dinov2_vits14, dinov2_vits14_reg, dino_vits16, demo_vit).
        weights: "pretrained", a tag, a local weights file or "random" (for tiny test models).
        drop_registers: drop register tokens of a reg checkpoint loaded into a non-register model (NeCo "XR").
        data: "synthetic" (in-memory synthetic scenes), an image folder or a dataset root / "key:path".
        synthetic_images: number of synthetic scenes when data is "synthetic".
        synthetic_size: side of the synthetic scenes in pixels.
        epochs: training epochs (T_total = epochs x iters_per_epoch drives every cosine schedule).
        max_steps: stop after this many optimiser steps (-1: run all epochs; schedules still use T_total).
        batch_size: images per process (B).
        num_workers: data-loader workers per process.
        lr_backbone: initial backbone learning rate.
        lr_head: initial head learning rate.
        final_lr: learning rate at the end of the cosine.
        lr_scaling: "none" (reference) or "linear" (lr x global batch / 256).
        weight_decay: initial weight decay of the decay groups.
        weight_decay_end: final weight decay (cosine).
        grad_clip_norm: optional gradient-norm clipping (none in the reference).
        accumulate_grad_batches: micro-batches per optimiser step.
        drop_path_rate: student stochastic depth (linear in depth, 0 -> rate); the teacher uses 0.
        pos_interp: position-embedding interpolation ("official" or "offset").
        size_policy: backbone size policy for crops not divisible by the patch size.
        crops: [global, local] crop counts (2 global required).
        sizes: [global, local] crop sides in pixels.
        scale_min: [global, local] minimum crop area fractions.
        scale_max: [global, local] maximum crop area fractions.
        min_intersection: overlap threshold as a fraction of the image area.
        jitter_strength: colour-jitter strength j.
        blur_strength: blur strength b.
        max_resample: rejected crop draws before the fallback box.
        head_layers: projection-head depth (3 or 1).
        head_hidden: projection-head hidden width.
        head_dim: projection-head output width E.
        teacher_head_init: "random" (reference) or "copy".
        use_teacher: EMA teacher (false: the student under no_grad is the teacher).
        roi_size: ROIAlign output side r (n = r^2 references).
        student_steepness: soft-sort steepness of the student.
        teacher_steepness: soft-sort steepness of the teacher.
        sort_net: "bitonic" or "odd_even".
        sim: "cosine" or "euclidean".
        reference_source: "queue" (teacher-token FIFO) or "batch".
        queue_length: total queue length (per process: queue_length // world size).
        loss_mask: "all" (released configs).
        momentum_start: EMA momentum at step 0.
        momentum_end: EMA momentum at the end.
        accelerator: Lightning accelerator ("auto", "cpu", "gpu").
        devices: Lightning devices ("auto", a count, or a list).
        num_nodes: number of nodes.
        strategy: Lightning strategy ("auto", "ddp", ...).
        precision: Lightning precision (default: bf16-mixed on GPU, 32-true on CPU).
        resume: a Lightning checkpoint to resume from.
        checkpoint_every: also checkpoint every this many optimiser steps (0: only at epoch ends).
        seed: global seed (reference 400).
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from ..io import atomic_write_text, run_metadata
    from ..methods.neco import NeCoConfig, NeCoViews, neco_collate
    from ..methods.neco.lightning import NeCoModule

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
              if k not in ("L", "DataLoader", "NeCoViews", "neco_collate", "atomic_write_text", "run_metadata",
                           "NeCoConfig", "NeCoModule")}
    if lr_scaling not in ("none", "linear"):
        raise ValueError(f"lr_scaling={lr_scaling!r}; choose 'none' or 'linear'")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True)
    cfg = NeCoConfig(head_layers=head_layers, head_hidden=head_hidden, head_dim=head_dim,
                     teacher_head_init=teacher_head_init, use_teacher=use_teacher, roi_size=roi_size,
                     student_steepness=student_steepness, teacher_steepness=teacher_steepness, sort_net=sort_net,
                     sim=sim, reference_source=reference_source, queue_length=queue_length, loss_mask=loss_mask,
                     momentum_start=momentum_start, momentum_end=momentum_end)
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    precision = precision or ("bf16-mixed" if gpu else "32-true")
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        precision=precision, max_epochs=epochs, max_steps=max_steps, default_root_dir=str(out),
                        accumulate_grad_batches=accumulate_grad_batches, gradient_clip_val=grad_clip_norm,
                        logger=L.pytorch.loggers.CSVLogger(str(out), name="logs"), enable_model_summary=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=str(out / "checkpoints"), save_last=True,
                            every_n_train_steps=checkpoint_every or None)],
                        use_distributed_sampler=True, log_every_n_steps=1, enable_progress_bar=False)
    world, rank = trainer.world_size, trainer.global_rank
    neco = build_neco(backbone, weights, cfg, drop_path_rate, pos_interp, size_policy, world, rank, seed,
                      drop_registers=drop_registers)
    bb = neco.student
    views = NeCoViews(tuple(crops), tuple(sizes), tuple(scale_min), tuple(scale_max), min_intersection=min_intersection,
                      jitter_strength=jitter_strength, blur_strength=blur_strength, max_resample=max_resample,
                      mean=tuple(bb.mean), std=tuple(bb.std))
    ds = build_dataset(data, views, seed, synthetic_images, synthetic_size)
    iters = len(ds) // (batch_size * world)
    if iters < 1:
        raise ValueError(f"neco fit: {len(ds)} images give no full batch of {batch_size} x {world} processes "
                         "(drop_last); use a smaller batch_size or more images")
    total = epochs * max(1, iters // accumulate_grad_batches)
    scale = batch_size * world * accumulate_grad_batches / 256 if lr_scaling == "linear" else 1.0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                        collate_fn=neco_collate, persistent_workers=num_workers > 0)
    meta = {"backbone": backbone, "weights": weights, "config": json.dumps(config, default=str),
            "model_kwargs": {}, "pos_interp": pos_interp, "size_policy": size_policy}
    module = NeCoModule(neco, lr_backbone * scale, lr_head * scale, final_lr, weight_decay, weight_decay_end, total,
                        meta=meta)
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None)
    if trainer.is_global_zero:
        export_path = out / "student.safetensors"
        start_info = dict(bb.weights_info)  # the weights NeCo started from (fit.json)
        bb.weights_info = {**start_info, "source": "neco"}  # the export records source=neco
        _export(bb, export_path, "dinokit", config)
        summary = {"steps": module.steps_taken, "lightning_global_step": int(trainer.global_step),
                   "total_steps": total, "skipped_nonfinite": module.skipped,
                   "last_loss": module.last_finite_loss, "export": str(export_path),
                   "meta": run_metadata(config, "neco/fit", start_info)}
        atomic_write_text(out / "fit.json", json.dumps(summary, indent=1, default=str))
        log.info("neco fit: %d steps, last loss %.5f, student exported to %s", module.steps_taken,
                 module.last_finite_loss, export_path)
    return 0


def _export(bb, path: Path, format: str, config: dict) -> Path:
    """``Backbone.export`` plus the NeCo run's config in the dinokit-format metadata (``neco_config``)."""
    bb.export(path, format=format)
    if format == "dinokit":
        from safetensors import safe_open
        from safetensors.torch import save_file

        from ..io import atomic_path

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        meta["neco_config"] = json.dumps(config, default=str)
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
    return path


@command("neco export")
def export(ckpt: Path, out: Path = Path("neco_student.safetensors"), which: str = "student",
           format: str = "dinokit", with_head: bool = False, seed: int = 0) -> int:
    """Export the student (or teacher) backbone of a NeCo checkpoint for ``load_backbone(weights=PATH)``.

    Args:
        ckpt: a Lightning checkpoint written by ``dinokit neco fit`` (e.g. runs/neco/checkpoints/last.ckpt).
        out: output file (.safetensors for format dinokit; .pth for official).
        which: "student" (default; what the reference evaluates) or "teacher".
        format: "dinokit" (safetensors, timm keys + metadata) or "official" (DINO/DINOv2 key layout).
        with_head: also write the projection head to ``<out stem>.head.safetensors``.
        seed: unused (export is deterministic); kept for the common command interface.
    """
    from ..methods.checkpoints import load_checkpoint_backbone

    bb, head_sd, config = load_checkpoint_backbone(ckpt, which)
    if bb.weights_info["source"] != "neco":
        raise ValueError(f"{ckpt} is a `dinokit {bb.weights_info['source']} fit` checkpoint, not a NeCo one; pass a "
                         ".ckpt written by `dinokit neco fit`")
    _export(bb, Path(out), format, config)
    if with_head:
        from safetensors.torch import save_file

        from ..io import atomic_path

        hp = Path(out).with_suffix("").with_suffix(".head.safetensors")
        with atomic_path(hp) as tmp:
            save_file({k: v.contiguous() for k, v in head_sd.items()}, str(tmp))
    log.info("exported the %s backbone of %s to %s", which, ckpt, out)
    return 0
