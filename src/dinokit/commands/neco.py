"""``dinokit neco fit`` / ``dinokit neco export`` and the thin Lightning module ``NeCoModule``.

The maths is in :mod:`dinokit.methods.neco`; this module wires data, the Lightning ``Trainer`` (DDP, mixed
precision, checkpoints), the AdamW groups with the cosine lr / weight-decay schedules, the EMA teacher and the
non-finite-step policy. Lightning is imported lazily (``NeCoModule`` is built on first access) so that the CLI stays
fast to start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import command, group

log = logging.getLogger(__name__)
group("neco", "NeCo dense post-training by patch-neighbour consistency, and its export")


_MODULE_CLASS = None


def _define_module():
    import lightning as L

    from ..methods.neco import NeCo, cosine_schedule, param_groups

    class NeCoModule(L.LightningModule):
        """Lightning wrapper of :class:`~dinokit.methods.neco.NeCo`.

        Per optimiser step t (``steps_taken``: real steps so far): lr(t) cosine ``lr -> final_lr`` per group,
        weight decay cosine ``weight_decay -> weight_decay_end`` on the decay groups, then the teacher EMA with the
        pre-step student (``on_before_optimizer_step``: once per real step, never for skipped steps or
        micro-batches). A non-finite loss on any rank skips the step on every rank (no backward, step, EMA or queue
        push); 50 in a row stop the run with an error.
        """

        def __init__(self, neco: NeCo, lr_backbone: float = 1e-5, lr_head: float = 1e-4, final_lr: float = 0.0,
                     weight_decay: float = 0.04, weight_decay_end: float = 0.5, total_steps: int = 1,
                     max_consecutive_skips: int = 50, meta: dict | None = None):
            super().__init__()
            self.neco = neco
            self.lr_backbone, self.lr_head, self.final_lr = lr_backbone, lr_head, final_lr
            self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
            self.total_steps = max(1, int(total_steps))
            self.max_consecutive_skips = max_consecutive_skips
            self.meta = dict(meta or {})
            self.skipped = 0
            self.consecutive_skips = 0
            self.last_finite_loss = float("nan")
            self.last_momentum = float("nan")
            self.inject_nan = False  # tests: force the next loss to NaN
            self.steps_taken = 0  # optimiser steps actually taken (drives lr, weight decay and EMA)
            self._finite = True

        def configure_optimizers(self):
            groups = param_groups(self.neco.student, self.neco.student_head, self.lr_backbone, self.lr_head,
                                  self.weight_decay)
            return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

        def _all_finite(self, loss: torch.Tensor) -> bool:
            flag = torch.isfinite(loss.detach()).all().float().reshape(1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag.item() > 0)

        def training_step(self, batch: dict, batch_idx: int):
            out = self.neco(batch)
            loss = out["loss"]
            if self.inject_nan:
                loss = loss * float("nan")
                self.inject_nan = False
            self._finite = self._all_finite(loss)
            if not self._finite:
                self.skipped += 1
                self.consecutive_skips += 1
                lr = self.lr_at(self.steps_taken)
                log.warning("neco: non-finite loss at step %d (lr %.3g, last finite loss %.6g): step skipped "
                            "(%d skipped so far)", self.steps_taken, lr, self.last_finite_loss, self.skipped)
                self.log("train/skipped_nonfinite", float(self.skipped), batch_size=batch["crops"][0].shape[0])
                if self.consecutive_skips >= self.max_consecutive_skips:
                    raise RuntimeError(f"neco: {self.consecutive_skips} consecutive non-finite losses; stopped at "
                                       f"step {self.steps_taken} (lr {lr:.3g}, last finite loss "
                                       f"{self.last_finite_loss:.6g}). Lower the learning rate or use bf16/fp32.")
                return None
            self.consecutive_skips = 0
            self.neco.commit_queues(out)
            self.last_finite_loss = float(loss.detach())
            B = batch["crops"][0].shape[0]
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B, sync_dist=True)
            self.log("train/fallback_rate", batch["n_fallback"].float().mean() / max(1, len(batch["crops"]) - 1),
                     batch_size=B)
            self.log("train/unsatisfied_rate", batch["n_unsatisfied"].float().mean(), batch_size=B)
            return loss

        def lr_at(self, t: int, base: float | None = None) -> float:
            return cosine_schedule(t, self.total_steps, self.lr_backbone if base is None else base, self.final_lr)

        def on_before_optimizer_step(self, optimizer) -> None:
            # Lightning calls this hook (and an optimiser step without gradients) even when training_step returned
            # None: a skipped step changes nothing here and is not counted
            if not self._finite:
                return
            t = self.steps_taken
            self.steps_taken += 1
            wd = cosine_schedule(t, self.total_steps, self.weight_decay, self.weight_decay_end)
            for g in optimizer.param_groups:
                g["lr"] = self.lr_at(t, g["base_lr"])
                if g.get("decay"):
                    g["weight_decay"] = wd
            self.last_momentum = self.neco.ema_step(t, self.total_steps)

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["neco_meta"] = self.meta
            checkpoint["neco_counters"] = {"steps_taken": self.steps_taken, "skipped": self.skipped,
                                           "consecutive_skips": self.consecutive_skips,
                                           "last_finite_loss": self.last_finite_loss}

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            c = checkpoint.get("neco_counters", {})
            self.skipped = c.get("skipped", 0)
            self.steps_taken = c.get("steps_taken", 0)
            self.consecutive_skips = c.get("consecutive_skips", 0)
            self.last_finite_loss = c.get("last_finite_loss", float("nan"))

    NeCoModule.__module__ = __name__
    return NeCoModule


def __getattr__(name: str):
    global _MODULE_CLASS
    if name == "NeCoModule":
        if _MODULE_CLASS is None:
            _MODULE_CLASS = _define_module()
        return _MODULE_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- data
def build_dataset(data: str, views, seed: int, synthetic_images: int = 256, synthetic_size: int = 96):
    """``synthetic`` (in-memory synthetic scenes) or any path / ``key:path`` that ``open_dataset`` reads."""
    from ..data.neco_views import NeCoDataset

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
    """NeCo dense post-training of a backbone (spec neco.md); writes checkpoints, the student export and a summary.

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

    from ..data.neco_views import NeCoViews, neco_collate
    from ..io import atomic_write_text, run_metadata
    from ..methods.neco import NeCoConfig

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
              if k not in ("L", "DataLoader", "NeCoViews", "neco_collate", "atomic_write_text", "run_metadata",
                           "NeCoConfig")}
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
    module = __getattr__("NeCoModule")(neco, lr_backbone * scale, lr_head * scale, final_lr, weight_decay,
                                       weight_decay_end, total, meta=meta)
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None)
    if trainer.is_global_zero:
        export_path = out / "student.safetensors"
        export_backbone(neco.student, export_path, config=config)
        summary = {"steps": module.steps_taken, "lightning_global_step": int(trainer.global_step),
                   "total_steps": total, "skipped_nonfinite": module.skipped,
                   "last_loss": module.last_finite_loss, "export": str(export_path),
                   "meta": run_metadata(config, "neco/fit", bb.weights_info)}
        atomic_write_text(out / "fit.json", json.dumps(summary, indent=1, default=str))
        log.info("neco fit: %d steps, last loss %.5f, student exported to %s", module.steps_taken,
                 module.last_finite_loss, export_path)
    return 0


def export_backbone(bb, path: Path, format: str = "dinokit", config: dict | None = None) -> Path:
    """Write a backbone so that ``load_backbone(weights=path)`` rebuilds it (dinokit safetensors + metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(bb, "export"):
        bb.export(path, format=format)
        if format == "dinokit" and config is not None:  # add the NeCo provenance to the metadata
            from safetensors import safe_open
            from safetensors.torch import save_file

            from ..io import atomic_path

            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            meta.update(source="neco", neco_config=json.dumps(config, default=str))
            with atomic_path(path) as tmp:
                save_file(sd, str(tmp), metadata=meta)
        return path
    if format != "dinokit":
        raise ValueError(f"format={format!r} needs Backbone.export; only 'dinokit' is available here")
    from safetensors.torch import save_file

    from ..io import atomic_path

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in bb.model.state_dict().items()}
    meta = {"dinokit_format": "1", "name": bb.name, "arch": bb.arch, "family": bb.family,
            "patch_size": str(bb.patch_size), "num_registers": str(bb.num_registers), "pos_interp": bb.pos_interp,
            "source": "neco", "neco_config": json.dumps(config or {}, default=str)}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return path


def load_checkpoint_backbone(ckpt: Path, which: str = "student"):
    """Rebuild the ``which`` backbone (and its head state) of a ``neco fit`` checkpoint."""
    from ..backbones import load_backbone

    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r}; choose 'student' or 'teacher'")
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist; pass a .ckpt written by `dinokit neco fit` "
                                "(runs/neco/checkpoints/last.ckpt)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    meta = state.get("neco_meta")
    if meta is None or "state_dict" not in state:
        raise ValueError(f"{ckpt} is not a `dinokit neco fit` checkpoint (no neco_meta / state_dict)")
    sd = state["state_dict"]
    prefix = f"neco.{which}."
    bb_sd = {k[len(prefix) + len("model."):]: v for k, v in sd.items() if k.startswith(prefix + "model.")}
    if not bb_sd:
        raise ValueError(f"{ckpt} has no {which} weights (use_teacher false has no teacher)")
    bb = load_backbone(meta["backbone"], weights="random", pos_interp=meta.get("pos_interp", "official"),
                       size_policy=meta.get("size_policy", "error"), model_kwargs=meta.get("model_kwargs") or None)
    missing, unexpected = bb.model.load_state_dict(bb_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: {which} weights do not fit {meta['backbone']}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    hp = f"neco.{which}_head."
    head_sd = {k[len(hp):]: v for k, v in sd.items() if k.startswith(hp)}
    bb.weights_info = {"source": "neco", "checkpoint": str(ckpt), "which": which}
    return bb, head_sd, json.loads(meta.get("config", "{}"))


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
    bb, head_sd, config = load_checkpoint_backbone(ckpt, which)
    export_backbone(bb, Path(out), format=format, config=config)
    if with_head:
        from safetensors.torch import save_file

        from ..io import atomic_path

        hp = Path(out).with_suffix("").with_suffix(".head.safetensors")
        with atomic_path(hp) as tmp:
            save_file({k: v.contiguous() for k, v in head_sd.items()}, str(tmp))
    log.info("exported the %s backbone of %s to %s", which, ckpt, out)
    return 0
