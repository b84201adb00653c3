"""``dinokit viz erf|attention|ccm``: the training callbacks' figures, drawn from a checkpoint without training."""

from __future__ import annotations

import json
from pathlib import Path

from . import command, group

group("viz", "Figures: effective receptive field, attention maps, cross-correlation matrix")


def _backbone(checkpoint: Path | None, backbone: str, weights: str, device: str = "cpu"):
    """The backbone to draw, in eval mode: the one trained in a dinokit Lightning checkpoint (.ckpt of ``neco fit``,
    ``bt fit`` or ``seg fit``), a weights file, or else ``load_backbone(backbone, weights)``."""
    from ..backbones import load_backbone

    if checkpoint is None:
        return load_backbone(backbone, weights=weights, device=device).eval()
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix != ".ckpt":
        return load_backbone(backbone, weights=str(path), device=device).eval()
    from ..methods.checkpoints import load_checkpoint_backbone

    return load_checkpoint_backbone(path).backbone.to(device).eval()


def _images(data: str, split: str, n: int, size: int, seed: int, mean, std, device: str):
    import numpy as np
    from PIL import Image

    from ..data.sources import open_source
    from ..data.transforms import to_tensor_batch

    ds = open_source(data, split, n=max(n, 1), size=size, seed=seed)
    if len(ds) == 0:
        raise ValueError(f"{data} ({split}) has no images")
    imgs = []
    for i in range(min(n, len(ds))):
        im = ds[i]["image"]
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
        imgs.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
    return to_tensor_batch(imgs, mean, std, device)


@command("viz erf")
def erf(out: Path = Path("runs/viz"), checkpoint: Path | None = None, backbone: str = "demo_vit",
        weights: str = "random", data: str = "synthetic", split: str = "val", layers: list[str] | None = None,
        n_images: int = 16, image_size: int = 64, log_scale: bool = True, device: str = "cpu", seed: int = 0) -> int:
    """Effective receptive fields of a backbone's layers (Luo et al.): ``<out>/erf.png`` and ``erf.json``.

    Args:
        out: output folder.
        checkpoint: a dinokit neco/bt/seg Lightning checkpoint (.ckpt) or a weights file; else --weights is used.
        backbone: backbone name (ignored when the .ckpt records one).
        weights: backbone weights without a checkpoint: pretrained, a tag, a file or random.
        data: "synthetic" or a dataset root / "key:path".
        split: dataset split to take the images from.
        layers: fnmatch patterns of module names (default: patch_embed, every ceil(depth/4)-th block, the last).
        n_images: images averaged.
        image_size: square input side (a multiple of the patch size).
        log_scale: plot log(ERF) (a ViT token's own patch dominates the linear scale).
        device: torch device.
        seed: random seed (synthetic data).
    """
    import torch

    from ..viz.erf import effective_receptive_field, plot_erf

    torch.manual_seed(seed)
    bb = _backbone(checkpoint, backbone, weights, device)
    x = _images(data, split, n_images, image_size, seed, bb.mean, bb.std, device)
    maps = effective_receptive_field(bb, x, layers)
    path = plot_erf(Path(out) / "erf.png", maps, log=log_scale, title=f"ERF of {bb.name}, {x.shape[0]} images")
    from ..io import atomic_write_text

    stats = {f"erf/{k}/nonzero_frac": float((v > 0).float().mean()) for k, v in maps.items()}
    atomic_write_text(Path(out) / "erf.json", json.dumps(stats, indent=1))
    print(f"wrote {path}")
    return 0


@command("viz attention")
def attention(out: Path = Path("runs/viz"), checkpoint: Path | None = None, backbone: str = "demo_vit",
              weights: str = "random", data: str = "synthetic", split: str = "val", n_images: int = 6,
              image_size: int = 64, tau: float = 0.6, block: int = -1, device: str = "cpu", seed: int = 0) -> int:
    """Last-block CLS attention per head and its mass-threshold masks: ``<out>/attention.png``.

    Args:
        out: output folder.
        checkpoint: a dinokit neco/bt/seg Lightning checkpoint (.ckpt) or a weights file; else --weights is used.
        backbone: backbone name (ignored when the .ckpt records one).
        weights: backbone weights without a checkpoint: pretrained, a tag, a file or random.
        data: "synthetic" or a dataset root / "key:path".
        split: dataset split to take the images from.
        n_images: rows of the figure.
        image_size: square input side (cropped to a multiple of the patch size).
        tau: attention mass kept by the masks.
        block: attention block (-1: last).
        device: torch device.
        seed: random seed (synthetic data).
    """
    from ..viz.callbacks import attention_figure, crop_to_patches, head_attention

    bb = _backbone(checkpoint, backbone, weights, device)
    if not bb.is_vit:
        raise ValueError(f"{bb.name} has no attention (ViT backbones only)")
    x = crop_to_patches(_images(data, split, n_images, image_size, seed, bb.mean, bb.std, device), bb.patch_size)
    attn = head_attention(bb, x, block)
    path = attention_figure(Path(out) / "attention.png", x, attn, bb.mean, bb.std, bb.patch_size, tau,
                            title=f"{bb.name} ({bb.weights_info.get('source', '?')} weights), block {block}")
    print(f"wrote {path}")
    return 0


@command("viz ccm")
def ccm(checkpoint: Path, out: Path = Path("runs/viz"), data: str = "synthetic", split: str = "val",
        n_images: int = 64, batch_size: int = 32, image_size: int = 64, augment: str = "official",
        crop_scale: tuple[float, float] = (0.08, 1.0), max_dims: int = 256, device: str = "cpu",
        seed: int = 0) -> int:
    """Barlow Twins cross-correlation C of a ``dinokit bt fit`` checkpoint: the mean of C over batches of two
    augmented views (the model in eval mode, the loss's batch standardisation as in training):
    ``<out>/cc_matrix.png`` and ``cc_matrix.json`` (mean diagonal, mean |off-diagonal|, fraction |C_ij| > 0.1).

    Args:
        checkpoint: a dinokit bt fit Lightning checkpoint (.ckpt).
        out: output folder.
        data: "synthetic" or a dataset root / "key:path".
        split: dataset split.
        n_images: images used (complete batches only).
        batch_size: images per batch (>= 2).
        image_size: side of the augmented views.
        augment: official or recvis.
        crop_scale: RandomResizedCrop scale range.
        max_dims: side of the drawn top-left block.
        device: torch device.
        seed: random seed (augmentations).
    """
    import torch

    from ..data.sources import open_source
    from ..io import atomic_write_text
    from ..methods.barlow_twins import TwoViews, barlow_twins_views
    from ..methods.barlow_twins.lightning import BarlowTwinsModule
    from ..viz.callbacks import ccm_figure, ccm_stats

    if batch_size < 2:
        raise ValueError("--batch_size must be >= 2 (the cross-correlation standardises over the batch)")
    torch.manual_seed(seed)
    module = BarlowTwinsModule.load_from_checkpoint(str(checkpoint), map_location="cpu", weights="random")
    module = module.to(device).eval()
    bb = module.backbone
    ds = open_source(data, split, n=n_images, size=image_size, seed=seed)
    views = TwoViews(ds, barlow_twins_views(augment, image_size, bb.mean, bb.std, tuple(crop_scale)))
    dl = torch.utils.data.DataLoader(views, batch_size, shuffle=False, drop_last=True)
    total, count = None, 0
    with torch.no_grad():
        for i, (x1, x2) in enumerate(dl):
            if i * batch_size >= n_images:
                break
            module.model(x1.to(device), x2.to(device))
            c = module.criterion.last_c
            total = c.clone() if total is None else total.add_(c)
            count += 1
    if not count:
        raise ValueError(f"no complete batch of {batch_size} in {len(ds)} images; lower --batch_size")
    mean = total / count
    path = ccm_figure(Path(out) / "cc_matrix.png", mean, max_dims, f"C ({split}, {count} batches)")
    atomic_write_text(Path(out) / "cc_matrix.json", json.dumps({f"cc_matrix/{k}": v for k, v in
                                                                 ccm_stats(mean).items()}, indent=1))
    print(f"wrote {path}")
    return 0
