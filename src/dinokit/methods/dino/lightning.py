"""Lightning wiring of DINO-style self-distillation: optimiser, per-step schedules, batched views, logging.

The mathematics lives in :mod:`dinokit.methods.dino`; this module only turns a batch of uint8 images into multi-crop
views (one seeded generator, so a run is reproducible), steps the learning-rate / weight-decay / teacher-temperature /
momentum schedules per optimiser step and updates the EMA teacher after each step. See docs/methods/dino.md.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from . import DINO, cosine_schedule, lr_at, momentum_schedule, teacher_temperature
from .views import MultiCropConfig, MultiCropViews, random_patch_masks


class DINOModule(pl.LightningModule):
    """Batches are (B, 3, S, S) uint8 images; ``training_step`` makes the views itself (batched).

    Args:
        backbone: dinokit backbone name (a ViT), created with ``weights``.
        weights: initial weights of the student ("random", "pretrained", a file).
        total_steps: length of the schedules (optimiser steps).
        lr: peak AdamW learning rate after ``warmup_steps`` linear warm-up; cosine to ``min_lr``.
        weight_decay, weight_decay_end: cosine weight-decay schedule of the parameters with ndim > 1.
        out_dim, patch_out_dim, hidden_dim, bottleneck_dim: head widths (CLS and patch heads).
        patch_weight: weight of the masked-patch loss (0: plain DINO).
        mask_ratio, mask_prob: fraction of masked patches ~ U(mask_ratio) for a share ``mask_prob`` of the images.
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup_steps: teacher temperature schedule.
        student_temp: student temperature.
        momentum: base teacher EMA momentum (cosine to 1).
        clip_grad: gradient-norm clip (0: none).
        views: multi-crop settings.
        seed: seed of the view generator.
    """

    def __init__(self, backbone: str = "demo_vit", weights: str = "random", total_steps: int = 1000,
                 lr: float = 1e-3, min_lr: float = 1e-6, warmup_steps: int = 100, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, out_dim: int = 2048, patch_out_dim: int = 1024,
                 hidden_dim: int = 512, bottleneck_dim: int = 128, patch_weight: float = 1.0,
                 mask_ratio: tuple[float, float] = (0.1, 0.5), mask_prob: float = 0.5, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup_steps: int = 300,
                 student_temp: float = 0.1, momentum: float = 0.996, clip_grad: float = 3.0,
                 views: MultiCropConfig | None = None, seed: int = 0):
        super().__init__()
        from ...backbones import load_backbone

        self.views_cfg = views or MultiCropConfig()
        self.save_hyperparameters(ignore=["views"])
        bb = load_backbone(backbone, weights=weights)
        if not bb.is_vit:
            raise ValueError(f"backbone {backbone!r} is not a ViT; DINO self-distillation here needs a ViT")
        # the timm model only (the student); the Backbone wrapper is not a submodule, so nothing is stored twice
        self.patch_size, self.weights_info = bb.patch_size, dict(bb.weights_info)
        self.model = DINO(bb.model, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                          patch_weight=patch_weight, patch_out_dim=patch_out_dim, student_temp=student_temp)
        self.views = MultiCropViews(self.views_cfg, bb.mean, bb.std)
        self.generator = torch.Generator().manual_seed(seed)
        self.automatic_optimization = False

    def configure_optimizers(self):
        params = self.model.student_parameters()
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)

    def schedules(self, step: int) -> dict[str, float]:
        """Learning rate, weight decay, teacher temperature and EMA momentum at optimiser step ``step``."""
        hp = self.hparams
        T = hp.total_steps
        return {"lr": lr_at(step, T, hp.warmup_steps, hp.lr, hp.min_lr),
                "weight_decay": cosine_schedule(step, T, hp.weight_decay, hp.weight_decay_end),
                "teacher_temp": teacher_temperature(step, hp.teacher_temp_warmup_steps, hp.warmup_teacher_temp,
                                                    hp.teacher_temp),
                "momentum": momentum_schedule(step, T, hp.momentum, 1.0)}

    def make_views(self, images: torch.Tensor) -> tuple[list, list, list | None]:
        """(B, 3, S, S) uint8 -> (global views, local views, masks or None), from the module's generator."""
        glob, loc = self.views(images.cpu(), self.generator)
        masks = None
        if self.hparams.patch_weight > 0:
            p = self.patch_size
            grid = (glob[0].shape[-2] // p, glob[0].shape[-1] // p)
            masks = [random_patch_masks(images.shape[0], grid, tuple(self.hparams.mask_ratio), self.hparams.mask_prob,
                                        self.generator).to(self.device) for _ in glob]
        return [g.to(self.device) for g in glob], [x.to(self.device) for x in loc], masks

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        step = int(self.global_step)
        s = self.schedules(step)
        opt = self.optimizers()
        for i, group in enumerate(opt.param_groups):
            group["lr"] = s["lr"]
            if i == 0:
                group["weight_decay"] = s["weight_decay"]
        glob, loc, masks = self.make_views(images)
        out = self.model(glob, loc, masks, s["teacher_temp"])
        opt.zero_grad(set_to_none=True)
        self.manual_backward(out["loss"])
        if self.hparams.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.student_parameters(), self.hparams.clip_grad)
        opt.step()
        self.model.update_teacher(s["momentum"])
        B = images.shape[0]
        for k, v in out.items():
            self.log(f"train/{k}", v.detach(), batch_size=B, prog_bar=k == "loss")
        for k in ("lr", "teacher_temp", "momentum"):
            self.log(f"train/{k}", s[k], batch_size=B)
        return out["loss"].detach()

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA teacher backbone's timm state dict (what DINO ships as the trained model)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.teacher.state_dict().items()}
