"""Absolute position-embedding interpolation policies (``offset`` = official DINO/DINOv2, ``antialias``)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

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


def _stored(model) -> tuple[torch.Tensor, int, tuple[int, int]]:
    npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    gs = tuple(model.patch_embed.grid_size)
    return model.pos_embed, npt, gs


def interpolate_pos_embed(bb, h: int, w: int) -> torch.Tensor:
    """(h*w, D) patch part of the position table at grid (h, w) under the backbone's policy."""
    pe, npt, (M0, M1) = _stored(bb.model)
    patch = pe[:, npt:]
    D = patch.shape[-1]
    if (h, w) == (M0, M1):
        return patch[0]
    grid = patch.reshape(1, M0, M1, D).permute(0, 3, 1, 2).float()
    if resolved_policy(bb) == "offset":
        out = F.interpolate(grid, scale_factor=((h + 0.1) / M0, (w + 0.1) / M1), mode="bicubic",
                            align_corners=False, antialias=False)
    else:
        out = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    if out.shape[-2:] != (h, w):
        raise RuntimeError(f"position interpolation gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(h * w, D).to(pe.dtype)


def install_pos_interp(bb) -> None:
    """Bind the offset policy into the model's ``_pos_embed`` where the family's official code uses it."""
    if resolved_policy(bb) != "offset":
        return
    model = bb.model

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pos = interpolate_pos_embed(bb, H, W).unsqueeze(0)
        x = x.reshape(B, H * W, C)
        to_cat = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pe, npt, _ = _stored(self)
        if getattr(self, "no_embed_class", False):
            x = torch.cat(to_cat + [x + pos], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + torch.cat([pe[:, :npt], pos], dim=1)
        return self.pos_drop(x)

    model._pos_embed = types.MethodType(_pos_embed, model)
