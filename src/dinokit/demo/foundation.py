"""Demo stage 1: synthetic benchmark on disk, a small ViT, sharded dense features, attention and PCA figures."""

from __future__ import annotations

import time

import torch

from ..backbones import load_backbone
from ..backbones.extract import extract_features
from ..backbones.shards import load_feature_dir
from ..data.layouts import write_cub_layout, write_voc_layout
from ..data.sources import ImageInput
from ..data.synthetic import SyntheticScenes
from ..io import run_metadata
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
    size = (ctx.image_size, ctx.image_size)
    n_val = max(8, ctx.n_images // 4)
    voc = write_voc_layout(ctx.data_root / "voc", ctx.n_images, n_val, size, seed=ctx.seed * 10 + 5, overwrite=True)
    cub = write_cub_layout(ctx.data_root / "cub", ctx.n_images, n_val, size, seed=ctx.seed * 10 + 6, overwrite=True)
    ctx.cache.update(voc_root=voc["root"], cub_root=cub["root"])
    bb = demo_backbone(ctx)
    ds = ImageInput(ctx.data_root / "voc", size, split="train", min_side=bb.patch_size)
    t0 = time.perf_counter()
    meta = run_metadata({"data": voc["root"], "backbone": bb.name, "weights": "random"}, "features", bb.weights_info)
    summary = extract_features(bb, ds, ctx.out / "features", batch_size=32, shard_size=64, meta=meta,
                               progress=False)
    dt = time.perf_counter() - t0
    fs = load_feature_dir(ctx.out / "features", expect_backbone=bb.name)
    ctx.cache["features_dir"] = str(ctx.out / "features")
    n_show = min(4, len(ds))
    imgs = [ds[i]["image"].permute(1, 2, 0).numpy() for i in range(n_show)]
    x = torch.stack([ds[i]["image"] for i in range(n_show)]).float().div(255)
    x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        attn = bb.attention(x.to(ctx.device), block=-1).renormalized().cpu()
    rgb = pca_rgb(fs.patch[:n_show].float())
    heads = attn.shape[1]
    masks = mass_threshold_mask(attn.mean(1), 0.6)
    panels, titles, overlays = [], [], []
    for i in range(n_show):
        head_maps = [upsample_map(attn[i, h], size) for h in range(heads)]
        panels.append([imgs[i], upsample_map(rgb[i], size), *[imgs[i]] * heads, imgs[i]])
        overlays.append([None, None, *head_maps, upsample_map(masks[i].float(), size)])
        titles.append([fs.image_ids[i][:18], "PCA of patches", *[f"head {h}" for h in range(heads)], "mask tau=0.6"])
    fig = save_grid(ctx.figures / "foundation_attention_pca.png", panels, titles, overlays=overlays)
    ctx.section("Synthetic benchmark, backbone, dense features and attention",
                f"Synthetic benchmark written as a VOC-style layout ({voc['n_train']} train / {voc['n_val']} val) and "
                f"a CUB-style fine-grained layout ({cub['n_train']} train / {cub['n_test']} test) under data/. "
                f"{bb.name} ({bb.arch}) with RANDOM weights (weights='random'): the maps below are those of an "
                f"untrained network. `dinokit features` pipeline: {len(fs.image_ids)} images read back through the "
                f"VOC loader into {summary['n_shards']} safetensors shard(s), grid {fs.grid}, "
                f"{len(fs.image_ids) / dt:.1f} images/s.",
                [fig], {"images": len(fs.image_ids), "grid": str(fs.grid), "embed_dim": int(fs.patch.shape[-1]),
                        "registers": int(fs.registers.shape[1])})
    ctx.cache["backbone"] = bb
    return {"images": len(fs.image_ids), "grid_h": fs.grid[0], "grid_w": fs.grid[1], "shards": summary["n_shards"],
            "images_per_s": round(len(fs.image_ids) / dt, 2), "weights": "random", "bad_files": len(summary["bad"])}
