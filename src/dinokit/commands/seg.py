"""``dinokit seg fit``: train a segmentation head on ViT patch tokens and report mIoU (VOC protocol)."""

from __future__ import annotations

import json
from pathlib import Path

from . import command, group

group("seg", "Segmentation heads on frozen or fine-tuned backbones")


@command("seg fit")
def fit(data: str = "synthetic", out: Path = Path("runs/seg"), head: str = "linear", backbone: str = "demo_vit",
        weights: str = "random", freeze_backbone: bool = True, loss: str = "ce", protocol: str = "orig",
        train_size: int = 224, eval_short_side: int = 320, recvis_size: int = 224, vflip: bool = False,
        max_epochs: int = 10, max_steps: int = -1, batch_size: int = 32, lr: float = 5e-3,
        weight_decay: float = 0.01, warmup_epochs: float = 5, num_workers: int = 0, accelerator: str = "cpu",
        devices: int = 1, precision: str = "32-true", synthetic_n: int = 64, synthetic_size: int = 64,
        resume: Path | None = None, seed: int = 0) -> int:
    """Train a segmentation head (frozen or fine-tuned backbone) and write ``<out>/results.json``.

    Result keys: ``<dataset>/seghead/<protocol>/<head>/miou`` (dataset ``voc`` for a VOC root, ``synthetic``).

    Args:
        data: "synthetic" (the embedded benchmark) or a dataset root / "key:path" (VOC: train -> val).
        out: output folder (checkpoints, CSV logs, results.json).
        head: linear, linear_patch, setr_naive, setr_pup, setr_pup_linear or aspp.
        backbone: backbone short name or timm architecture (a ViT).
        weights: backbone weights: "pretrained", a tag, a file (e.g. a Barlow Twins export) or "random".
        freeze_backbone: keep the backbone frozen (default) or fine-tune it at 0.1x the head lr.
        loss: ce, dice or ce+dice.
        protocol: orig (ignore 255, original resolution) or recvis224 (void as background, 224x224).
        train_size: side of the square training crops (a multiple of the patch size).
        eval_short_side: orig protocol: shorter side of the evaluation input (sides rounded to the patch size).
        recvis_size: recvis224 protocol: the square evaluation size.
        vflip: also flip vertically with p 0.5 (RecvisProject).
        max_epochs: training epochs.
        max_steps: stop after this many optimiser steps (-1: no limit).
        batch_size: images per batch.
        lr: AdamW learning rate of the head.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up epochs before the cosine.
        num_workers: DataLoader workers.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: number of devices (DDP when > 1).
        precision: Lightning precision, e.g. 32-true or bf16-mixed.
        synthetic_n: synthetic data: images per split.
        synthetic_size: synthetic data: image side in pixels.
        resume: a Lightning checkpoint to resume from.
        seed: random seed (model init, crops, order).
    """
    import lightning.pytorch as pl
    import torch

    from ..data.sources import is_synthetic, open_source
    from ..io import atomic_write_text, run_metadata
    from ..methods.seg_heads import HEADS, Mapped, SegEvalTransform, SegTrainTransform, collate_eval, collate_train
    from ..methods.seg_heads.lightning import SegmentationModule
    from ..methods.training import trainer_kwargs

    if head not in HEADS:
        raise ValueError(f"--head {head!r}: choose one of {HEADS}")
    pl.seed_everything(seed, workers=True)
    out = Path(out)
    train_ds = open_source(data, "train", n=synthetic_n, size=synthetic_size, seed=seed)
    k = int(getattr(train_ds, "num_classes", 0) or 0)
    val_ds = open_source(data, "val", n=synthetic_n, size=synthetic_size, seed=seed)
    if k <= 0:
        raise ValueError(f"{data}: the dataset does not declare its number of classes")
    module = SegmentationModule(backbone, "random" if resume else weights, head, k, freeze_backbone, loss, lr,
                                weight_decay, warmup_epochs, batch_size, protocol, recvis_size)
    bb = module.backbone
    if train_size % bb.patch_size:
        raise ValueError(f"--train_size {train_size} is not a multiple of the patch size {bb.patch_size}")
    tr = Mapped(train_ds, SegTrainTransform(train_size, vflip=0.5 if vflip else 0.0, mean=bb.mean, std=bb.std))
    va = Mapped(val_ds, SegEvalTransform(bb.patch_size, protocol, eval_short_side, recvis_size, bb.mean, bb.std))
    g = torch.Generator().manual_seed(seed)
    train_dl = torch.utils.data.DataLoader(tr, batch_size, shuffle=True, drop_last=len(tr) >= 2 * batch_size,
                                           num_workers=num_workers, collate_fn=collate_train, generator=g)
    val_dl = torch.utils.data.DataLoader(va, batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_eval)
    trainer = pl.Trainer(**trainer_kwargs(accelerator, devices, precision, max_epochs, out, max_steps),
                         deterministic="warn")
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume) if resume else None)
    miou = float(trainer.callback_metrics["val/miou"])
    name = "synthetic" if is_synthetic(data) else getattr(train_ds, "key", "dataset")
    result = {f"{name}/seghead/{protocol}/{head}/miou": miou,
              "meta": run_metadata(dict(data=str(data), head=head, backbone=backbone, freeze_backbone=freeze_backbone,
                                        loss=loss, train_size=train_size, eval_short_side=eval_short_side,
                                        max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                                        weight_decay=weight_decay, seed=seed), protocol, bb.weights_info)}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "meta"}))
    return 0
