"""Stage-wise RASA training on a frozen backbone through Lightning: the per-stage module and the fit that runs one
``lightning.Trainer`` per stage (fresh AdamW + per-step cosine to 0, restarted every stage). See docs/methods/rasa.md.

The maths (head, loss, stopping rule, checkpoints) is in :mod:`dinokit.methods.rasa`; only commands and tests import
this module. The backbone is loaded once (with its pretrained weights) by the caller and shared by every stage: each
stage trains on the very same frozen, really-loaded backbone (upstream's 2025-07 snapshot re-created it and loaded
the weights only for stage 1).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import collate_images, freeze, raw_features
from .head import RASAHead, probe_mse
from .stages import RASAFitResult, StageRecord, cosine_lr, run_stages, validate_probe

log = logging.getLogger(__name__)


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
    """Fit a RASA head stage by stage on a frozen, already-loaded backbone.

    Args:
        backbone: a :class:`dinokit.backbones.Backbone` (its weights loaded once, shared by all stages).
        train_data: dataset of (3, S, S) training tensors (e.g. :class:`~dinokit.methods.rasa.ImagesOnly` +
            :func:`~dinokit.methods.rasa.rasa_train_transform`).
        val_data: dataset of (3, S', S') validation tensors (:func:`~dinokit.methods.rasa.rasa_val_transform`).
        stage_metrics: optional ``(head_with_probe_committed_view, val_batches) -> dict`` added to each record
            (e.g. spatial entropy / overclustering of raw vs debiased features).
        out_dir: stage checkpoints ``stage{t:02d}.pth`` + ``progress.json`` (atomic); ``resume`` continues there.
    Other arguments: the defaults of docs/methods/rasa.md; ``accelerator``/``devices``/``strategy`` go to
    ``lightning.Trainer``.
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
