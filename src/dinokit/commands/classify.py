"""``dinokit classify fit``: the localisation-guided classification recipe (see docs/methods/localisation.md)."""

from __future__ import annotations

import json
from pathlib import Path

from . import command, group

group("classify", "The localized-crop classification recipe (ResNet-50 / ViT on CUB-style data)")


@command("classify fit")
def fit(data: str = "synthetic", out: Path = Path("runs/classify"), crop: str = "rrc", boxes: str = "gt",
        thr: float = 1.0, missing_box: str = "error", density_source: str = "online",
        density_cache: Path | None = None, density_backbone: str = "demo_vit", density_weights: str = "random",
        density_block: int = -1, density_k: int = 5, density_minmax: bool = False,
        density_temperature: float | None = None, att_size: int = 224, canvas: int = 512,
        arch: str = "resnet50", weights: str = "pretrained", model_kwargs: dict | None = None,
        split_mode: str = "dinov2_consistent", n_train: int = 512, n_val: int = 256, image_size: int = 64,
        size: int = 224, epochs: int = 200, batch_size: int = 32, lr: float = 2e-4, lr_end: float = 1e-5,
        schedule: str = "step", warmup_epochs: int = 0, weight_decay: float = 1e-4, momentum: float = 0.9,
        label_smoothing: float = 0.1, ema_decay: float = 0.999, ema_every: int = 32,
        bn_freeze_after_epoch: int | None = None, colour_aug: bool = True, num_workers: int = 4,
        accelerator: str = "auto", devices: int = 1, precision: str = "32-true", seed: int = 0) -> int:
    """Train a ResNet classifier with crop mode rrc | localized | density; writes metrics.json and the weights.

    Args:
        data: ``synthetic`` (fine-grained scenes; boxes[0] = the main object) or a CUB-200-2011 root.
        out: output folder (metrics.json, model.safetensors, ema.safetensors).
        crop: ``rrc`` | ``localized`` | ``density``.
        boxes: ``gt`` or a pseudo-box JSON ({id: [x, y, w, h]}, from ``dinokit boxes``) for ``localized``.
        thr: LocalizedRandomResizedCrop threshold (1 keeps the whole box).
        missing_box: ``error`` or ``rrc`` (RandomResizedCrop for training images without a box, counted).
        density_source: ``online`` (batched on the training device) or ``cache`` (``dinokit crops density-cache``).
        density_cache: the safetensors cache for ``density_source=cache``.
        density_backbone: ViT giving the attention for online density crops.
        density_weights: its weights (``pretrained``, tag, file or ``random``).
        density_block: its attention block.
        density_k: density mean-filter size (odd).
        density_minmax: per-image min-max before the softmax.
        density_temperature: softmax temperature (default 0.4, 0.1 with min-max).
        att_size: side of the backbone input in the online design (a multiple of the patch size).
        canvas: padded canvas side of the online design.
        arch: timm architecture (``resnet50``; tests use a tiny ``resnet10t``).
        weights: ``pretrained`` (resnet50.tv2_in1k), ``random`` or a state-dict file (stage 2 from stage 1's EMA).
        model_kwargs: extra timm kwargs (e.g. ``{channels: [16, 32, 64, 128], stem_width: 8}``).
        split_mode: CUB split: ``dinov2_consistent`` (8,251 / 3,537), ``official`` or ``random70``.
        n_train: synthetic training scenes.
        n_val: synthetic validation scenes.
        image_size: side of the synthetic scenes.
        size: training / validation crop side.
        epochs: epochs.
        batch_size: global batch (divided by the number of devices).
        lr: base learning rate (stage 1: 1e-3).
        lr_end: final learning rate of the schedule.
        schedule: ``step`` (per epoch, every 10 epochs) or ``cosine`` (per step).
        warmup_epochs: linear warm-up epochs (cosine only).
        weight_decay: weight decay of the ndim > 1 parameters (0 for BN and biases).
        momentum: SGD momentum.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: EMA decay.
        ema_every: EMA update period in within-epoch batches.
        bn_freeze_after_epoch: reproduce the reference's frozen BN statistics from this epoch (default: never).
        colour_aug: the colour-only RandomChoice augmentation.
        num_workers: DataLoader workers.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: number of devices (DDP when > 1).
        precision: Lightning precision (``32-true``; ``bf16-mixed`` allowed).
        seed: seed of the data order, augmentations and initialisation.
    """
    import torch

    from ..data import crops as C
    from ..io import atomic_write_text, run_metadata
    from ..methods import classifier as K
    from ..methods.classifier.lightning import fit_classifier

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
              if k not in ("torch", "C", "K", "fit_classifier", "atomic_write_text", "run_metadata")}
    torch.manual_seed(seed)
    if data == "synthetic":
        from ..data.synthetic import SyntheticScenes, num_classes

        train_src = K.SceneSource(SyntheticScenes(n_train, (image_size, image_size), seed=seed * 10,
                                                  fine_grained=True))
        val_src = K.SceneSource(SyntheticScenes(n_val, (image_size, image_size), seed=seed * 10 + 1,
                                                fine_grained=True))
        n_cls, key = num_classes(True), "synthetic"
    else:
        train_src = K.CUBSource(data, "train", split_mode)
        val_src = K.CUBSource(data, "val", split_mode)
        n_cls, key = train_src.num_classes, "cub"
        labels = {val_src.ds.records[i].label for i in range(len(val_src))}
        print(f"validation covers {len(labels)} of {n_cls} classes")
    box_table: str | dict = "gt"
    if crop == "localized" and boxes != "gt":
        box_table = C.read_box_json(boxes, train_src.ids, allow_extra=True)
    dcfg = C.DensityConfig(block=density_block, k=density_k, minmax=density_minmax, temperature=density_temperature,
                           att_size=att_size, canvas=canvas)
    cache = None
    density = None
    if crop == "density":
        if density_source == "cache":
            if density_cache is None:
                raise ValueError("density_source=cache needs density_cache=<file from `dinokit crops density-cache`>")
            cache = C.DensityCache(density_cache, expected={"backbone": density_backbone, "block": density_block},
                                   ids=train_src.ids, cfg=dcfg, out_size=size)
        else:
            from ..backbones import load_backbone

            bb = load_backbone(density_backbone, weights=density_weights)
            density = C.OnlineDensityCrops(bb, size, dcfg, seed=seed)
    train_set = K.CropDataset(train_src, True, crop, size, thr, box_table, missing_box, colour_aug,
                              density_source, cache, canvas)
    val_set = K.CropDataset(val_src, False, "rrc", size)
    model = K.build_classifier(arch, n_cls, weights, model_kwargs)
    cfg = K.RecipeConfig(lr=lr, lr_end=lr_end, momentum=momentum, weight_decay=weight_decay, epochs=epochs,
                         schedule=schedule, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                         ema_decay=ema_decay, ema_every=ema_every, bn_freeze_after_epoch=bn_freeze_after_epoch)
    accel = accelerator if accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    metrics, _ = fit_classifier(train_set, val_set, model, cfg, batch_size, num_workers, density, accel, devices,
                                precision, seed, Path(out))
    mode = crop if crop != "localized" else f"localized-{'gt' if boxes == 'gt' else 'file'}-thr{thr:g}"
    flat = {f"{key}/classify/{mode}/s{seed}/{k.replace('val/', '')}": v for k, v in metrics.items()}
    atomic_write_text(Path(out) / "metrics.json", json.dumps({**flat, "meta": run_metadata(config, "classify")},
                                                             indent=1, default=str))
    print(json.dumps(flat, indent=1))
    return 0
