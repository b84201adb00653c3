"""Demo stage 1: synthetic benchmark, a small ViT, dense features, attention and PCA figures."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..backbones import load_backbone
from ..data.synthetic import SyntheticScenes
from ..data.transforms import to_tensor_batch
from ..viz import mass_threshold_mask, pca_rgb, save_grid, upsample_map


def demo_scenes(ctx, split: str = "train", fine_grained: bool = False) -> SyntheticScenes:
    """The demo's scenes: split seeds are derived from the run seed, so train and val never overlap."""
    offset = {"train": 0, "val": 1, "test": 2}[split]
    return SyntheticScenes(ctx.n_images, (ctx.image_size, ctx.image_size), seed=ctx.seed * 10 + offset,
                           fine_grained=fine_grained)


def demo_backbone(ctx):
    """The demo ViT (``demo_vit``: p 8, D 96, 4 blocks, learned absolute positions), random init."""
    return load_backbone("demo_vit", weights="random", device=ctx.device).eval()


def run(ctx) -> dict[str, float]:
    scenes = demo_scenes(ctx, "train")
    bb = demo_backbone(ctx)
    imgs = [scenes[i].image for i in range(len(scenes))]
    t0 = time.perf_counter()
    feats, attns = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 32):
            x = to_tensor_batch(imgs[i:i + 32], bb.mean, bb.std, ctx.device)
            f, a = bb(x, attention_block=-1)
            feats.append(f.patch.cpu())
            attns.append(a.cls.cpu())
    dt = time.perf_counter() - t0
    patch, attn = torch.cat(feats), torch.cat(attns)
    n_show = min(4, len(imgs))
    rgb = pca_rgb(patch[:n_show])
    size = (ctx.image_size, ctx.image_size)
    heads = attn.shape[1]
    masks = mass_threshold_mask(attn[:n_show].mean(1), 0.6)
    panels, titles, overlays = [], [], []
    for i in range(n_show):
        head_maps = [upsample_map(attn[i, h], size) for h in range(heads)]
        panels.append([imgs[i], upsample_map(rgb[i], size), *[imgs[i]] * heads, imgs[i]])
        overlays.append([None, None, *head_maps, upsample_map(masks[i].float(), size)])
        titles.append(["image", "PCA of patches", *[f"head {h}" for h in range(heads)], "mask tau=0.6"])
    fig = save_grid(ctx.figures / "foundation_attention_pca.png", panels, titles, overlays=overlays)
    ctx.section("Backbone, dense features and attention",
                f"{bb.name} ({bb.arch}), RANDOM initialisation (weights='random'): the patterns below are "
                f"those of an untrained network. {len(imgs)} scenes, grid {tuple(patch.shape[1:3])}, "
                f"{len(imgs) / dt:.1f} images/s for features + last-block attention in one pass.",
                [fig], {"images": len(imgs), "grid": str(tuple(patch.shape[1:3])), "embed_dim": patch.shape[-1]})
    ctx.cache["backbone"] = bb
    return {"images": len(imgs), "grid_h": int(patch.shape[1]), "grid_w": int(patch.shape[2]),
            "images_per_s": round(len(imgs) / dt, 2), "weights": "random",
            "attention_mass_check": float(np.abs(attn.sum((-2, -1)).numpy() <= 1 + 1e-5).mean())}
