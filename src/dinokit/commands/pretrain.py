"""``dinokit pretrain``: DINO-style self-distillation of a small ViT on the embedded synthetic benchmark.

Reproducible from scratch: one seed drives the initialisation, the scene stream and the views; a fixed thread count
and deterministic algorithms make the same machine give the same weights. Writes ``<out>/<backbone>.safetensors``
(the EMA teacher backbone, dinokit format) and ``<out>/<backbone>.json`` (provenance). See docs/methods/dino.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import command


def canonical_safetensors(path: Path) -> Path:
    """Rewrite a safetensors file's JSON header with sorted keys (safetensors writes its metadata map in a
    per-process random order), so the same tensors and metadata always give byte-identical files."""
    from ..io import atomic_write_bytes

    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return Path(path)


@command("pretrain")
def pretrain(out: Path = Path("runs/pretrain"), backbone: str = "demo_vit", image_size: int = 64,
             local_size: int = 32, n_local: int = 4, global_scale: tuple[float, float] = (0.35, 1.0),
             local_scale: tuple[float, float] = (0.08, 0.35), steps: int = 2000, batch_size: int = 64,
             lr: float = 1e-3, min_lr: float = 1e-6, warmup_steps: int = 100, weight_decay: float = 0.04,
             weight_decay_end: float = 0.4, out_dim: int = 1024, patch_out_dim: int = 512, hidden_dim: int = 256,
             bottleneck_dim: int = 128, patch_weight: float = 1.0, mask_ratio: tuple[float, float] = (0.1, 0.5),
             mask_prob: float = 0.5, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
             teacher_temp_warmup_steps: int = 600, momentum: float = 0.996, clip_grad: float = 3.0,
             fine_every: int = 4, data_seed: int = 1000, threads: int = 1, dtype: str = "float32",
             log_every: int = 50, save_every: int = 0, seed: int = 0) -> int:
    """Pretrain ``backbone`` from random initialisation with DINO (+ masked-patch) self-distillation on an
    unbounded stream of synthetic scenes; export the EMA teacher.

    Args:
        out: output folder (``<backbone>.safetensors``, ``<backbone>.json``, ``train_log.jsonl``).
        backbone: dinokit ViT short name (the demo's ``demo_vit``: patch 8, D 96, 4 blocks).
        image_size: side of the scenes and of the global views in pixels (a multiple of the patch size).
        local_size: side of the local views in pixels (a multiple of the patch size).
        n_local: local views per image.
        global_scale: area range of the global crops (fraction of the image).
        local_scale: area range of the local crops.
        steps: optimiser steps (one batch each; the stream never repeats a scene).
        batch_size: images per step.
        lr: peak AdamW learning rate (after the warm-up), cosine to min_lr.
        min_lr: final learning rate.
        warmup_steps: linear learning-rate warm-up steps.
        weight_decay: initial weight decay (parameters with ndim > 1).
        weight_decay_end: final weight decay (cosine).
        out_dim: prototypes of the CLS head.
        patch_out_dim: prototypes of the patch head.
        hidden_dim: hidden width of both head MLPs.
        bottleneck_dim: bottleneck width before the weight-normalised last layer.
        patch_weight: weight of the masked-patch loss (0: plain DINO).
        mask_ratio: range of the masked fraction of patches of a masked global view.
        mask_prob: probability that a global view is masked.
        teacher_temp: final teacher temperature.
        warmup_teacher_temp: initial teacher temperature.
        teacher_temp_warmup_steps: steps of the linear teacher-temperature warm-up.
        momentum: initial teacher EMA momentum (cosine to 1).
        clip_grad: gradient-norm clip (0: none).
        fine_every: every k-th scene of the stream is a fine-grained scene (0: none).
        data_seed: benchmark seed of the training stream (keep it apart from the evaluation seeds).
        threads: torch intra-op threads (fixed, for reproducible sums).
        dtype: dtype of the exported weights: float32 or float16.
        log_every: print and log the losses every this many steps.
        save_every: also export the teacher every this many steps as ``<backbone>_step<k>.safetensors`` (0: never).
        seed: seed of the initialisation, the views and the masks.
    """
    import lightning.pytorch as pl
    import torch

    from ..backbones import load_backbone
    from ..backbones import weights as W
    from ..io import atomic_write_text, run_metadata
    from ..methods.dino.lightning import DINOModule
    from ..methods.dino.views import MultiCropConfig, SceneStream

    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype {dtype!r}; choose float32 or float16")
    if steps <= 0 or batch_size < 2:
        raise ValueError(f"--steps {steps} must be > 0 and --batch_size {batch_size} >= 2 (the centre is a batch "
                         "mean)")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
              if k not in ("pl", "torch", "load_backbone", "W", "atomic_write_text", "run_metadata", "DINOModule",
                           "MultiCropConfig", "SceneStream")}
    torch.set_num_threads(threads)
    pl.seed_everything(seed, workers=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    probe = load_backbone(backbone, weights="random")
    p = probe.patch_size
    if image_size % p or local_size % p:
        raise ValueError(f"--image_size {image_size} and --local_size {local_size} must be multiples of the patch "
                         f"size {p} of {backbone}")
    views = MultiCropConfig(global_size=image_size, local_size=local_size, n_local=n_local,
                            global_scale=tuple(global_scale), local_scale=tuple(local_scale))
    module = DINOModule(backbone=backbone, weights="random", total_steps=steps, lr=lr, min_lr=min_lr,
                        warmup_steps=warmup_steps, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
                        out_dim=out_dim, patch_out_dim=patch_out_dim, hidden_dim=hidden_dim,
                        bottleneck_dim=bottleneck_dim, patch_weight=patch_weight, mask_ratio=tuple(mask_ratio),
                        mask_prob=mask_prob, teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
                        teacher_temp_warmup_steps=teacher_temp_warmup_steps, momentum=momentum, clip_grad=clip_grad,
                        views=views, seed=seed)
    stream = SceneStream(steps * batch_size, image_size, seed=data_seed, fine_every=fine_every)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=0)

    def export(path: Path) -> Path:
        bb = load_backbone(backbone, weights="random")
        sd = module.teacher_state_dict()
        if dtype == "float16":
            sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        bb.model.load_state_dict({k: v.float() for k, v in sd.items()})
        bb.weights_info = {"source": "dinokit pretrain"}
        if dtype == "float16":
            bb.model.half()
        return canonical_safetensors(W.export(bb, path))

    log_path = out / "train_log.jsonl"
    lines: list[str] = []
    t_start = time.perf_counter()

    class _Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % log_every == 0 or step == steps:
                m = {k.split("/", 1)[1]: round(float(v), 5) for k, v in trainer.callback_metrics.items()
                     if k.startswith("train/")}
                rec = {"step": step, "seconds": round(time.perf_counter() - t_start, 1), **m}
                lines.append(json.dumps(rec, allow_nan=True))
                atomic_write_text(log_path, "\n".join(lines) + "\n")
                print(json.dumps(rec), flush=True)
            if save_every and step % save_every == 0 and step < steps:
                export(out / f"{backbone}_step{step}.safetensors")

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, deterministic=True,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_Progress()], num_sanity_val_steps=0)
    trainer.fit(module, loader)
    wall = time.perf_counter() - t_start
    path = export(out / f"{backbone}.safetensors")
    digest = W.sha256(path)
    meta = run_metadata(config, "dinokit pretrain (DINO + masked-patch self-distillation, synthetic benchmark)",
                        {"source": "random", "name": backbone})
    prov = {"name": backbone, "file": path.name, "sha256": digest, "bytes": path.stat().st_size, "dtype": dtype,
            "seed": seed, "steps": steps, "images_seen": steps * batch_size, "wall_seconds": round(wall, 1),
            "threads": threads, "weights": "EMA teacher backbone", "data": {
                "generator": "dinokit.data.synthetic.render_scene", "seed": data_seed, "size": image_size,
                "fine_every": fine_every, "indices": [0, steps * batch_size]},
            "final": json.loads(lines[-1]) if lines else {}, "meta": meta}
    atomic_write_text(out / f"{backbone}.json", json.dumps(prov, indent=1, allow_nan=False, default=str))
    print(f"wrote {path} ({path.stat().st_size} bytes, sha256 {digest}) in {wall:.0f} s")
    return 0
