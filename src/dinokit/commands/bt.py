"""``dinokit bt fit``: Barlow Twins pretraining of a ViT (or ResNet), with attention / ERF / cross-correlation
figures."""

from __future__ import annotations

import json
from pathlib import Path

from . import command, group

group("bt", "Barlow Twins pretraining of ViTs")


@command("bt fit")
def fit(data: str = "synthetic", out: Path = Path("runs/bt"), backbone: str = "demo_vit", weights: str = "random",
        projector: str = "small", pool: str = "cls", lambd: float = 0.0051, norm: str = "batchnorm",
        eps: float = 1e-5, augment: str = "official", image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        optimizer: str = "adamw", lr: float = 3e-4, lr_scaling: str = "none", weight_decay: float = 1e-5,
        warmup_epochs: float = 10, max_epochs: int = 100, max_steps: int = -1, batch_size: int = 256,
        num_workers: int = 0, figures: bool = True, erf: bool = True, every_n_epochs: int = 1,
        accelerator: str = "cpu", devices: int = 1, precision: str = "32-true", synthetic_n: int = 64,
        synthetic_size: int = 64, resume: Path | None = None, seed: int = 0) -> int:
    """Barlow Twins pretraining; writes checkpoints, figures, ``backbone_init.safetensors`` (the starting weights),
    ``backbone.safetensors`` (the trained backbone, loadable with ``--weights``) and ``results.json``.

    The global batch is batch_size x devices (embeddings are all-gathered under DDP); a global batch below 64 warns.

    Args:
        data: "synthetic" (the embedded benchmark) or a dataset root / "key:path" (train split; val for figures).
        out: output folder.
        backbone: backbone short name or timm architecture (dino_vits16 with weights=pretrained starts from DINO).
        weights: initial backbone weights: "random", "pretrained", a tag or a file.
        projector: "official" (8192-8192-8192), "small" (512-512-512) or widths "a-b-c".
        pool: projector input for ViTs: cls (final-norm CLS token) or mean (mean of final-norm patch tokens).
        lambd: weight of the redundancy-reduction (off-diagonal) term.
        norm: batch standardisation: batchnorm (biased variance, official) or unbiased (RecvisProject).
        eps: variance epsilon of the standardisation.
        augment: official (RandomResizedCrop) or recvis (square resize first, weaker blur).
        image_size: side of the augmented views (a multiple of the patch size).
        crop_scale: RandomResizedCrop scale range.
        optimizer: adamw (ViT default) or lars (official ResNet-50 recipe).
        lr: AdamW learning rate (absolute unless lr_scaling=linear).
        lr_scaling: none or linear (lr x global batch / 256).
        weight_decay: weight decay (parameters with ndim <= 1 get none).
        warmup_epochs: linear warm-up epochs (stepped per optimiser step), then cosine to 0.001 x lr.
        max_epochs: training epochs.
        max_steps: stop after this many optimiser steps (-1: no limit).
        batch_size: per-device batch size (>= 2).
        num_workers: DataLoader workers.
        figures: attach the attention-map and cross-correlation callbacks.
        erf: attach the effective-receptive-field callback.
        every_n_epochs: figure frequency.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: number of devices (DDP when > 1).
        precision: Lightning precision (32-true, bf16-mixed, 16-mixed); the loss always runs in fp32.
        synthetic_n: synthetic data: images per split.
        synthetic_size: synthetic data: image side in pixels.
        resume: a Lightning checkpoint (e.g. <out>/checkpoints/last.ckpt) to resume from.
        seed: random seed.
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..data.sources import open_source
    from ..io import atomic_write_text, run_metadata
    from ..methods.barlow_twins import TwoViews, barlow_twins_views
    from ..methods.barlow_twins.lightning import BarlowTwinsModule
    from ..methods.training import trainer_kwargs
    from ..viz import callbacks as cbs

    if batch_size < 2:
        raise ValueError(f"--batch_size {batch_size}: Barlow Twins standardises each dimension over the batch, so "
                         "it is undefined for a batch of 1; use >= 2 (a global batch >= 256 is recommended)")
    pl.seed_everything(seed, workers=True)
    out = Path(out)
    # on resume the checkpoint supplies every weight, so the initial weights are not fetched again
    module = BarlowTwinsModule(backbone=backbone, weights="random" if resume else weights, projector=projector,
                               pool=pool, lambd=lambd, norm=norm, eps=eps, optimizer=optimizer, lr=lr,
                               lr_scaling=lr_scaling, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                               batch_size=batch_size)
    bb = module.backbone
    p = bb.patch_size if bb.is_vit else 1
    if image_size % p:
        raise ValueError(f"--image_size {image_size} is not a multiple of the patch size {p} of {backbone}")
    views = barlow_twins_views(augment, image_size, bb.mean, bb.std, tuple(crop_scale))
    train_ds = open_source(data, "train", n=synthetic_n, size=synthetic_size, seed=seed)
    val_ds = open_source(data, "val", n=synthetic_n, size=synthetic_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train_dl = torch.utils.data.DataLoader(TwoViews(train_ds, views), batch_size, shuffle=True, drop_last=True,
                                           num_workers=num_workers, generator=g)
    if len(train_dl) == 0:
        raise ValueError(f"{len(train_ds)} training images < batch_size {batch_size} (batches are dropped when "
                         "incomplete); lower --batch_size")
    val_dl = torch.utils.data.DataLoader(TwoViews(val_ds, views), batch_size, shuffle=False,
                                         drop_last=len(val_ds) >= batch_size, num_workers=num_workers)
    callbacks: list = [ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True)]
    if figures:
        callbacks.append(cbs.CrossCorrelationCallback(every_n_epochs=every_n_epochs))
        if bb.is_vit:
            callbacks.append(cbs.AttentionMapCallback(every_n_epochs=every_n_epochs))
    if erf:
        callbacks.append(cbs.ERFCallback(every_n_epochs=every_n_epochs, log_scale=True))  # own patch dominates
    trainer = pl.Trainer(**trainer_kwargs(accelerator, devices, precision, max_epochs, out, max_steps),
                         callbacks=callbacks)
    start_info = dict(bb.weights_info)  # the starting weights (results.json)
    if not resume and trainer.is_global_zero:  # the starting point, for before/after comparisons
        bb.export(out / "backbone_init.safetensors")
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        bb.weights_info = {**start_info, "source": "dinokit bt fit"}  # recorded in the export's metadata
        bb.export(out / "backbone.safetensors")
        result = {**{f"bt/{k}": v for k, v in metrics.items()},
                  "meta": run_metadata(dict(data=str(data), backbone=backbone, weights=weights, projector=projector,
                                            pool=pool, lambd=lambd, norm=norm, eps=eps, augment=augment,
                                            image_size=image_size, optimizer=optimizer, lr=lr,
                                            lr_scaling=lr_scaling, weight_decay=weight_decay,
                                            warmup_epochs=warmup_epochs, max_epochs=max_epochs,
                                            batch_size=batch_size, devices=devices, seed=seed),
                                       "barlow_twins", start_info)}
        atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "meta"}))
    return 0
