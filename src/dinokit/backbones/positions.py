"""Absolute position-embedding interpolation policies (docs/backbones.md).

``offset`` (official DINO v1 / DINOv2 hub code): bicubic with scale factor ((h + 0.1)/M, (w + 0.1)/M), no antialias.
``antialias`` (official DINOv2 with registers; timm's ``dynamic_img_size`` default): bicubic to (h, w), antialias.
dinokit binds :class:`OffsetPosEmbed` as the model instance's ``_pos_embed`` where the offset policy applies, so
``forward_features`` and ``forward_intermediates`` both use it. Tables are cached per (h, w, dtype, device) when no
gradient is needed, keyed on the parameter's version counter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POS_INTERP = ("official", "offset", "antialias")


def resolved_policy(bb) -> str | None:
    """The concrete policy of a backbone: ``offset``, ``antialias`` or None (RoPE / ResNet)."""
    if bb.pos_interp not in POS_INTERP:
        raise ValueError(f"pos_interp={bb.pos_interp!r}; choose one of {POS_INTERP}")
    if not bb.is_vit or getattr(bb.model, "pos_embed", None) is None:
        if bb.pos_interp != "official":
            raise ValueError(f"{bb.name} has no learned position table (RoPE/ResNet): pos_interp must be 'official'")
        return None
    if bb.pos_interp != "official":
        return bb.pos_interp
    return "antialias" if bb.num_registers else "offset"


def _stored(model: nn.Module) -> tuple[torch.Tensor, int, tuple[int, int]]:
    npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return model.pos_embed, npt, tuple(model.patch_embed.grid_size)


def interpolate_table(model: nn.Module, h: int, w: int, policy: str) -> torch.Tensor:
    """(h*w, D) patch part of ``model.pos_embed`` at grid (h, w) under ``policy`` (differentiable)."""
    pe, npt, (M0, M1) = _stored(model)
    patch = pe[:, npt:]
    D = patch.shape[-1]
    if (h, w) == (M0, M1):
        return patch[0]
    grid = patch.reshape(1, M0, M1, D).permute(0, 3, 1, 2).float()
    if policy == "offset":
        out = F.interpolate(grid, scale_factor=((h + 0.1) / M0, (w + 0.1) / M1), mode="bicubic",
                            align_corners=False, antialias=False)
    elif policy == "antialias":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    else:
        raise ValueError(f"unknown position policy {policy!r}; choose 'offset' or 'antialias'")
    if out.shape[-2:] != (h, w):
        raise RuntimeError(f"position interpolation gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(h * w, D).to(pe.dtype)


def interpolate_pos_embed(bb, h: int, w: int) -> torch.Tensor:
    """(h*w, D) patch position embedding of backbone ``bb`` at grid (h, w) under its policy."""
    policy = resolved_policy(bb)
    fn = bb.model.__dict__.get("_pos_embed")
    if isinstance(fn, OffsetPosEmbed):
        return fn.table(h, w)
    return interpolate_table(bb.model, h, w, policy)


class OffsetPosEmbed:
    """Replacement of a timm ``VisionTransformer._pos_embed`` (x (B, h, w, D) -> tokens (B, N, D)) with the given
    interpolation policy. A plain object (not a module) holding its model, so ``deepcopy`` and pickling rebind it
    to the copy; the cache is not copied."""

    def __init__(self, model: nn.Module, policy: str = "offset"):
        self.model = model
        self.policy = policy
        self.cache: dict = {}

    def __getstate__(self) -> dict:
        return {"model": self.model, "policy": self.policy, "cache": {}}

    def table(self, h: int, w: int) -> torch.Tensor:
        """(h*w, D) table; cached when no gradient is needed (key includes the parameter's version)."""
        pe = self.model.pos_embed
        if torch.is_grad_enabled() and pe.requires_grad:
            return interpolate_table(self.model, h, w, self.policy)
        key = (h, w, pe.dtype, pe.device, pe._version, pe.data_ptr(), torch.is_inference_mode_enabled())
        hit = self.cache.get(key)
        if hit is None:
            if len(self.cache) > 16:
                self.cache.clear()
            with torch.no_grad():
                hit = interpolate_table(self.model, h, w, self.policy)
            self.cache[key] = hit
        return hit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        B, H, W, C = x.shape
        pos = self.table(H, W).unsqueeze(0)
        x = x.reshape(B, H * W, C)
        to_cat = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        pe, npt, _ = _stored(m)
        if getattr(m, "no_embed_class", False):
            x = torch.cat(to_cat + [x + pos], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + torch.cat([pe[:, :npt], pos], dim=1)
        return m.pos_drop(x)


def install_pos_interp(bb) -> None:
    """Bind the offset policy into the model's ``_pos_embed`` where it applies (official non-register DINO /
    DINOv2, or ``pos_interp='offset'``); ``antialias`` keeps timm's own dynamic path."""
    policy = resolved_policy(bb)
    if policy == "offset":
        bb.model._pos_embed = OffsetPosEmbed(bb.model, policy)
    elif "_pos_embed" in bb.model.__dict__:
        del bb.model.__dict__["_pos_embed"]
