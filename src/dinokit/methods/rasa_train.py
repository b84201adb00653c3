"""Stage-wise RASA training on a frozen backbone: the thin Lightning module, data transforms and the stage loop.

The maths (head, loss, stopping rule, checkpoints) is in :mod:`dinokit.methods.rasa`; this module only wires a
``lightning.Trainer`` per stage (fresh AdamW + per-step cosine to 0, restarted every stage) around it.
Spec: ``shared/spec/rasa.md`` §7-§9.

The backbone is loaded once (with its pretrained weights) by the caller and shared by every stage: each stage
trains on the very same frozen, really-loaded backbone (spec §12 item 2; upstream's 2025-07 snapshot re-created it
and loaded the weights only for stage 1).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .rasa import (
    RASAFitResult,
    RASAHead,
    StageRecord,
    cosine_lr,
    probe_mse,
    run_stages,
    validate_probe,
)

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- data
def rasa_train_transform(crop_size: int = 518, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, photometric: bool = True, geometric: bool = True,
                         normalize_std_typo: bool = False) -> Callable:
    """Spec §7 training transform: RandomResizedCrop, colour jitter / grayscale / blur, hflip + vflip + rotation
    (U(-90, 90) degrees, p 0.5, nearest, fill 0), normalise. PIL or uint8 (3, H, W) in, float (3, S, S) out.
    The flips and rotation break content-position correlations; the position targets do not move with them."""
    from torchvision.transforms import v2 as T

    std = tuple(std)
    if normalize_std_typo:  # upstream's training transforms used 0.255 for blue (spec §12 item 3)
        std = (std[0], std[1], 0.255)
    ops: list = [T.ToImage(), T.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio),
                                                  interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if photometric:
        ops += [T.RandomApply([T.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8), T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel_size=_blur_kernel(crop_size), sigma=(0.1, 2.0))], p=0.5)]
    if geometric:
        ops += [T.RandomHorizontalFlip(0.5), T.RandomVerticalFlip(0.5),
                T.RandomApply([T.RandomRotation((-90, 90), interpolation=T.InterpolationMode.NEAREST,
                                                expand=False, fill=0)], p=0.5)]
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # about 10% of the crop, odd
    return k


def rasa_val_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> Callable:
    """Spec §8 validation transform: squash-resize to ``size`` x ``size`` (bilinear, antialias), normalise."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR,
                                            antialias=True), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(list(mean), list(std))])


def _image_of(item) -> object:
    """The image of a dataset item: a dinokit item dict (``image``), a synthetic ``Scene``, a (PIL, ...) tuple, an
    (H, W, 3) uint8 array or a PIL image."""
    if isinstance(item, dict):
        return item.get("image")
    if hasattr(item, "image") and hasattr(item, "mask"):
        return item.image
    if isinstance(item, tuple | list):
        return item[0]
    return item


class ImagesOnly(Dataset):
    """Images of any dinokit dataset (labels dropped) through ``transform``; bad files give ``None``.

    Args:
        source: an indexable dataset (``ImageFolder``, ``VOCSegmentation``, ``SyntheticScenes``, a list of arrays).
        transform: PIL/uint8 image -> (3, S, S) float tensor.
    """

    def __init__(self, source, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        img = _image_of(self.source[i])
        if img is None:
            return None
        if isinstance(img, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        return self.transform(img)


def collate_images(batch: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack images, dropping bad files (``None``)."""
    items = [b for b in batch if b is not None]
    if not items:
        return torch.zeros(0, 3, 1, 1)
    return torch.stack(items)


@contextlib.contextmanager
def raw_features(backbone):
    """Temporarily disable ``backbone.feature_transform`` (training sees the raw final-norm tokens)."""
    saved = getattr(backbone, "feature_transform", None)
    backbone.feature_transform = None
    try:
        yield backbone
    finally:
        backbone.feature_transform = saved


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode, ``requires_grad=False`` on every parameter."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


# --------------------------------------------------------------------------------------------- Lightning
class RASAStageModule(L.LightningModule):
    """Trains ``head.probe`` for one stage on the frozen backbone's final-norm patch tokens.

    Per batch: x = backbone(images) (no_grad, eval); h = folded committed stages (x); loss = MSE(sigmoid(h probe^T),
    targets). Optimiser: AdamW on the probe only; LR: cosine from ``lr`` to 0 per step over the stage.
    """

    def __init__(self, backbone: nn.Module, head: RASAHead, lr: float = 2e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 backbone_precision: str = "fp32"):
        super().__init__()
        if head.probe is None:
            raise ValueError("head has no probe; call head.new_probe(seed) first")
        self.backbone = freeze(backbone)
        self.head = head
        self.folded = head.fold()
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        if backbone_precision not in ("fp32", "bf16"):
            raise ValueError(f"backbone_precision={backbone_precision!r}; choose 'fp32' or 'bf16'")
        self.backbone_precision = backbone_precision

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # always frozen in eval mode
        return self

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """x^(t-1): raw final-norm patch tokens (B, h, w, D) through the committed stages, fp32."""
        ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if self.backbone_precision == "bf16" \
            else contextlib.nullcontext()
        with raw_features(self.backbone), ctx:
            x = self.backbone.forward_features(images).patch
        return self.folded(x.float())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        if batch.shape[0] == 0:
            return None
        loss = probe_mse(self.tokens(batch), self.head.probe, self.head.activation)
        self.log("train/mse", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([self.head.probe], lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------------------------- stage loop
def _val_batches(backbone, loader: DataLoader, device: torch.device, cache: dict) -> list[torch.Tensor]:
    """Raw val tokens (CPU fp32), computed once per fit (the val transform is deterministic)."""
    if "val" not in cache:
        out = []
        with torch.no_grad(), raw_features(backbone):
            for images in loader:
                if images.shape[0]:
                    out.append(backbone.forward_features(images.to(device)).patch.float().cpu())
        if not out:
            raise ValueError("the validation set yielded no images")
        cache["val"] = out
    return cache["val"]


def fit_rasa_backbone(backbone, train_data, val_data, *, batch_size: int = 128, epochs: int = 5,
                      lr: float = 2e-4, weight_decay: float = 0.0, stopping: str = "fixed",
                      max_stages: int | None = 9, min_stages: int = 1, rtol: float = 0.05, audit: bool = True,
                      seed: int = 400, out_dir: Path | None = None, resume: bool = True, num_workers: int = 0,
                      shuffle: bool = True, accelerator: str = "auto", devices: int | str = 1,
                      strategy: str = "auto", backbone_precision: str = "fp32", val_batch_size: int = 64,
                      stage_metrics: Callable[[RASAHead, list[torch.Tensor]], dict[str, float]] | None = None,
                      on_record: Callable[[StageRecord], None] | None = None,
                      trainer_kwargs: dict | None = None) -> RASAFitResult:
    """Fit a RASA head stage by stage on a frozen, already-loaded backbone (spec §7).

    Args:
        backbone: a :class:`dinokit.backbones.Backbone` (its weights loaded once, shared by all stages).
        train_data: dataset of (3, S, S) training tensors (e.g. :class:`ImagesOnly` + :func:`rasa_train_transform`).
        val_data: dataset of (3, S', S') validation tensors (:func:`rasa_val_transform`).
        stage_metrics: optional ``(head_with_probe_committed_view, val_batches) -> dict`` added to each record
            (e.g. spatial entropy / overclustering of raw vs debiased features).
        out_dir: stage checkpoints ``stage{t:02d}.pth`` + ``progress.json`` (atomic); ``resume`` continues there.
    Other arguments: spec §7 defaults; ``accelerator``/``devices``/``strategy`` go to ``lightning.Trainer``.
    """
    freeze(backbone)
    head = RASAHead(int(backbone.embed_dim))
    val_loader = DataLoader(val_data, batch_size=val_batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_images)
    device = next(backbone.parameters()).device
    cache: dict = {}
    pe_fn = None
    if backbone.position_embedding(2, 2) is not None:
        def pe_fn(h: int, w: int) -> torch.Tensor:
            with torch.no_grad():
                return backbone.position_embedding(h, w).detach().float().cpu()

    def train_probe(h: RASAHead, t: int) -> None:
        L.seed_everything(seed + t, workers=True, verbose=False)
        g = torch.Generator().manual_seed(seed + t)
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=shuffle, drop_last=True,
                            num_workers=num_workers, collate_fn=collate_images, generator=g,
                            persistent_workers=False)
        if len(loader) == 0:
            raise ValueError(f"the training set has {len(train_data)} images, fewer than one batch of "
                             f"{batch_size} (drop_last); lower --batch_size or add images")
        module = RASAStageModule(backbone, h, lr=lr, weight_decay=weight_decay,
                                 backbone_precision=backbone_precision)
        kw = dict(max_epochs=epochs, accelerator=accelerator, devices=devices, strategy=strategy,
                  logger=False, enable_checkpointing=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=None, deterministic=False,
                  enable_progress_bar=False)
        kw.update(trainer_kwargs or {})
        L.Trainer(**kw).fit(module, loader)
        h.probe.data = module.head.probe.data.to(h.stage_weights.device)
        backbone.to(device)

    def validate(h: RASAHead, t: int) -> StageRecord:
        vb = _val_batches(backbone, val_loader, device, cache)
        rec = validate_probe(h, t, vb, pe_fn)
        if stage_metrics is not None:
            view = RASAHead(h.embed_dim, h.activation,
                            torch.cat([h.stage_weights.cpu(), h.probe.detach().cpu()[None]]))
            rec.metrics.update(stage_metrics(view, vb))
        log.info("RASA stage %d: val mse %.6f, chance %.6f, r2 %.4f", t, rec.mse, rec.chance, rec.r2)
        return rec

    return run_stages(head, train_probe, validate, stopping=stopping, max_stages=max_stages, min_stages=min_stages,
                      rtol=rtol, audit=audit, seed=seed, out_dir=out_dir, resume=resume, on_record=on_record)


def entropy_stage_metrics(in_size: int, dataset: str = "val", k: int = 100, seeds: Sequence[int] = (0,),
                          max_tokens: int = 400_000) -> Callable[[RASAHead, list[torch.Tensor]], dict[str, float]]:
    """Per-stage spatial entropy ``se1`` (dense_eval §7) of raw vs debiased (through stage t) val tokens.

    Keys ``{dataset}/feat-{raw|debiased}/spatial_entropy/se1/in{in_size}/k{K}/se`` (at most ``max_tokens`` tokens).
    """
    from ..eval.entropy import spatial_entropy_of_features

    def fn(head: RASAHead, batches: list[torch.Tensor]) -> dict[str, float]:
        raw = torch.cat(batches)
        n = max(1, min(raw.shape[0], max_tokens // max(1, raw.shape[1] * raw.shape[2])))
        raw = raw[:n]
        h, w = raw.shape[1:3]
        kk = min(k, raw.shape[0] * h * w)
        out = {}
        for name, feats in (("raw", raw), ("debiased", head(raw))):
            se = spatial_entropy_of_features(feats, k=kk, seeds=tuple(seeds))
            out[f"{dataset}/feat-{name}/spatial_entropy/se1/in{in_size}/k{kk}/se"] = se["se"]
        return out

    return fn


def overcluster_stage_metrics(masks: torch.Tensor, num_classes: int, in_size: int, dataset: str = "val",
                              ks: Sequence[int | None] = (500, 300, None), seeds: Sequence[int] = (1,),
                              ignore_index: int | None = 255
                              ) -> Callable[[RASAHead, list[torch.Tensor]], dict[str, float]]:
    """Per-stage overclustering mIoU of raw vs debiased tokens of the first ``len(masks)`` val images.

    ``masks``: (n, S, S) int64 labels at the validation size. Runs dinokit's ``fast100`` pipeline (standardise,
    PCA-50, faiss k-means, 100x100 evaluation; ``None`` in ``ks`` = the number of classes, Hungarian) - not the
    ``train100`` pixel-upsampled variant of spec §8. Keys
    ``{dataset}/feat-{raw|debiased}/overcluster/fast100/in{S}/n{n}/k{K}/miou``. The raw score is computed once.
    """
    from ..eval.overcluster import overcluster

    n = int(masks.shape[0])
    cache: dict[str, dict[str, float]] = {}

    def fn(head: RASAHead, batches: list[torch.Tensor]) -> dict[str, float]:
        raw = torch.cat(batches)[:n]
        tokens = raw.shape[0] * raw.shape[1] * raw.shape[2]
        kk = sorted({num_classes if k is None else int(k) for k in ks} & set(range(1, tokens + 1)), reverse=True)
        out: dict[str, float] = {}
        for name in ("raw", "debiased"):
            if name in cache:
                out.update(cache[name])
                continue
            feats = raw if name == "raw" else head(raw)
            r = overcluster(feats, masks[:raw.shape[0]], num_classes, ks=kk, seeds=tuple(seeds),
                            ignore_index=ignore_index)
            m = {f"{dataset}/feat-{name}/overcluster/fast100/in{in_size}/n{raw.shape[0]}/k{k}/miou":
                 r.metrics[f"k{k}/miou"] for k in kk}
            if name == "raw":
                cache[name] = m
            out.update(m)
        return out

    return fn


def val_masks(source, n: int, size: int) -> torch.Tensor | None:
    """(n', size, size) int64 nearest-resized masks of the first ``n`` items of ``source``; None without masks."""
    import torch.nn.functional as F

    out = []
    for i in range(min(n, len(source))):
        item = source[i]
        m = item.get("mask") if isinstance(item, dict) else getattr(item, "mask", None)
        if m is None:
            return None
        t = torch.as_tensor(np.asarray(m, dtype=np.int64))[None, None].double()
        out.append(F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long())
    return torch.stack(out) if out else None
