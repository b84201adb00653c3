"""SAM masks as the second box source (extra ``dinokit[sam]``): masks from a local checkpoint, one mask per image
chosen by a selection rule, with an on-disk cache. See docs/methods/localisation.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...eval.boxes import box_iou
from ...io import atomic_write_bytes
from .boxes import mask_to_box

SAM_SELECT = ("attention", "ncm", "largest", "oracle")


def mask_extents(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) boolean masks -> (N, 4) tight ``[x, y, w, h]`` (zeros for an empty mask)."""
    out = np.zeros((len(masks), 4), np.int64)
    for n, m in enumerate(np.asarray(masks, bool)):
        b = mask_to_box(m, "extent")
        if b is not None:
            out[n] = b
    return out


def square_crop_box(box: Sequence[float], size: tuple[int, int]) -> list[int]:
    """The square of side max(w, h) (at most min(H, W)) centred on ``box`` and shifted inside the (H, W) image, as
    integer ``[x, y, side, side]`` (the ``ncm`` feature crop of §1.6)."""
    H, W = size
    x, y, w, h = box
    side = int(min(max(w, h), H, W))
    side = max(side, 1)
    x0 = min(max(int(math.floor(x + w / 2 - side / 2 + 0.5)), 0), W - side)
    y0 = min(max(int(math.floor(y + h / 2 - side / 2 + 0.5)), 0), H - side)
    return [x0, y0, side, side]


def select_sam_mask(masks: np.ndarray, select: str = "attention", attention_mask: np.ndarray | None = None,
                    features: torch.Tensor | None = None, prototype: torch.Tensor | None = None,
                    gt_box: Sequence[float] | None = None) -> int:
    """Index of the chosen mask among (N, H, W) boolean ``masks`` (-1 when there is none to choose).

    ``attention``: highest IoU with ``attention_mask`` (the tau = 0.6 mass mask at original size); ``ncm``: highest
    cosine similarity of ``features`` (N, D) (classifier features of each mask's square crop) to ``prototype`` (D,),
    the mean L2-normalised feature of the image's ground-truth class; ``largest``: the largest mask covering < 95 % of
    the image; ``oracle``: the best box IoU with ``gt_box`` (analysis only).
    """
    if select not in SAM_SELECT:
        raise ValueError(f"select={select!r}; choose one of {SAM_SELECT}")
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or len(masks) == 0:
        return -1
    if select == "attention":
        if attention_mask is None:
            raise ValueError("select='attention' needs the attention mass mask (attention_mask)")
        am = np.asarray(attention_mask, bool)
        inter = (masks & am[None]).sum((1, 2))
        union = (masks | am[None]).sum((1, 2))
        return int(np.argmax(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))
    if select == "ncm":
        if features is None or prototype is None:
            raise ValueError("select='ncm' needs per-mask features (N, D) and the gt-class prototype (D,)")
        f = F.normalize(torch.as_tensor(features).float(), dim=-1)
        p = F.normalize(torch.as_tensor(prototype).float().reshape(-1), dim=0)
        return int((f @ p).argmax())
    if select == "largest":
        area = masks.sum((1, 2))
        ok = area < 0.95 * masks.shape[1] * masks.shape[2]
        return int(np.argmax(np.where(ok, area, -1))) if ok.any() else -1
    if gt_box is None:
        raise ValueError("select='oracle' needs the ground-truth box")
    return int(np.argmax(box_iou(mask_extents(masks).astype(np.float64), np.asarray([gt_box], np.float64),
                                 fmt="xywh")[:, 0]))


def sam_mask_generator(checkpoint: str | Path, model_type: str = "vit_h", device: str = "cpu",
                       points_per_side: int = 10, stability_score_thresh: float = 0.5):
    """A ``segment_anything.SamAutomaticMaskGenerator`` from a **local** checkpoint (nothing is downloaded)."""
    try:
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    except ImportError as err:
        raise ImportError("SAM boxes need the optional extra: pip install 'dinokit[sam]'") from err
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"SAM checkpoint {ckpt} not found: download it yourself (e.g. sam_vit_h_4b8939.pth) "
                                "and pass its local path; dinokit never downloads it")
    sam = sam_model_registry[model_type](checkpoint=str(ckpt)).to(device)
    return SamAutomaticMaskGenerator(sam, points_per_side=points_per_side,
                                     stability_score_thresh=stability_score_thresh)


def sam_masks(image: np.ndarray, generator, fallback_generator=None, cache: str | Path | None = None) -> dict:
    """SAM masks of one (H, W, 3) uint8 image as arrays (``segmentation`` (N, H, W) bool, ``area``, ``bbox``,
    ``predicted_iou``, ``stability_score``); a second generator (points 3, stability 0.3) runs when the first finds
    nothing. With ``cache`` (an ``.npz`` path), the result is read from / written to it."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    found = generator.generate(image)
    if not found and fallback_generator is not None:
        found = fallback_generator.generate(image)
    H, W = image.shape[:2]
    out = {"segmentation": np.stack([m["segmentation"] for m in found]) if found else np.zeros((0, H, W), bool),
           "area": np.asarray([m["area"] for m in found], np.int64),
           "bbox": np.asarray([m["bbox"] for m in found], np.float64).reshape(-1, 4),
           "predicted_iou": np.asarray([m["predicted_iou"] for m in found], np.float64),
           "stability_score": np.asarray([m["stability_score"] for m in found], np.float64)}
    if cache is not None:
        import io as _io
        buf = _io.BytesIO()
        np.savez_compressed(buf, **out)
        atomic_write_bytes(cache, buf.getvalue())
    return out
