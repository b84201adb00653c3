"""Box localisation metrics: IoU, asymmetric IoU (intersection / GT area), maIoU, CorLoc (docs/eval/boxes.md).

Boxes are ``(x1, y1, x2, y2)`` float pixel coordinates, continuous and half-open; area = max(0, x2-x1)·max(0, y2-y1).
Every pairwise function is vectorised, (N, 4) x (M, 4) -> (N, M), accepts torch or numpy (returns the same kind)
and takes ``fmt="xyxy"`` (default) or ``fmt="xywh"`` (``[x, y, w, h]``, the pseudo-box file format).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LOST_EPS = 1e-7


def _t(x: torch.Tensor | np.ndarray | Sequence, fmt: str = "xyxy") -> torch.Tensor:
    b = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(b.shape)}")
    if fmt == "xywh":
        return xywh_to_xyxy(b)
    if fmt != "xyxy":
        raise ValueError(f"unknown box format {fmt!r}; choose 'xyxy' or 'xywh'")
    return b


def _out(v: torch.Tensor, like) -> torch.Tensor | np.ndarray:
    return v if isinstance(like, torch.Tensor) else v.numpy()


def xywh_to_xyxy(b: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """COCO/CUB/pseudo-box ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)``."""
    t = torch.as_tensor(b, dtype=torch.float64)
    out = torch.cat([t[..., :2], t[..., :2] + t[..., 2:]], -1)
    return _out(out, b)


def voc_to_xyxy(b: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """VOC XML boxes (1-based inclusive ``xmin, ymin, xmax, ymax``) -> ``(xmin - 1, ymin - 1, xmax, ymax)``."""
    t = torch.as_tensor(b, dtype=torch.float64)
    out = torch.cat([t[..., :2] - 1, t[..., 2:]], -1)
    return _out(out, b)


def crop_to_xyxy(top: float, left: float, h: float, w: float) -> tuple[float, float, float, float]:
    """A crop ``(top, left, h, w)`` (torchvision ``get_params`` order) -> ``(left, top, left + w, top + h)``."""
    return (float(left), float(top), float(left + w), float(top + h))


def grid_box_to_xyxy(r0: int, r1: int, c0: int, c1: int, patch_size: int, height: int,
                     width: int) -> tuple[float, float, float, float]:
    """A patch-grid component spanning rows [r0, r1) and columns [c0, c1) -> pixel box, x2/y2 clipped to W/H."""
    p = patch_size
    return (float(c0 * p), float(r0 * p), float(min(c1 * p, width)), float(min(r1 * p, height)))


def box_area(b: torch.Tensor | np.ndarray, fmt: str = "xyxy") -> torch.Tensor | np.ndarray:
    """(N,) areas max(0, x2 - x1)·max(0, y2 - y1)."""
    t = _t(b, fmt)
    return _out((t[:, 2] - t[:, 0]).clamp_min(0) * (t[:, 3] - t[:, 1]).clamp_min(0), b)


def box_intersection(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
                     fmt: str = "xyxy") -> torch.Tensor | np.ndarray:
    """(N, M) intersection areas."""
    return _out(_inter(_t(a, fmt), _t(b, fmt)), a)


def _inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    return wh[..., 0] * wh[..., 1]


def _area(t: torch.Tensor) -> torch.Tensor:
    return (t[:, 2] - t[:, 0]).clamp_min(0) * (t[:, 3] - t[:, 1]).clamp_min(0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def box_iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, fmt: str = "xyxy",
            iou_mode: str = "standard") -> torch.Tensor | np.ndarray:
    """(N, M) IoU = inter / (A_a + A_b - inter), 0 when the union is 0.

    ``iou_mode="lost"``: valeoai/LOST's inter / (w_a(h_a + ε) + w_b(h_b + ε) - inter + ε), ε = 1e-7.
    """
    ta, tb = _t(a, fmt), _t(b, fmt)
    inter = _inter(ta, tb)
    if iou_mode == "standard":
        union = _area(ta)[:, None] + _area(tb)[None, :] - inter
        return _out(_safe_div(inter, union), a)
    if iou_mode == "lost":
        wa, ha = ta[:, 2] - ta[:, 0], ta[:, 3] - ta[:, 1]
        wb, hb = tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1]
        union = (wa * (ha + LOST_EPS))[:, None] + (wb * (hb + LOST_EPS))[None, :] - inter + LOST_EPS
        return _out(inter / union, a)
    raise ValueError(f"unknown iou_mode {iou_mode!r}; choose 'standard' or 'lost'")


def box_aiou(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray,
             fmt: str = "xyxy") -> torch.Tensor | np.ndarray:
    """(N, M) asymmetric IoU = inter / A_gt (0 if A_gt = 0); 1 iff the gt box lies inside the prediction."""
    tp, tg = _t(pred, fmt), _t(gt, fmt)
    return _out(_safe_div(_inter(tp, tg), _area(tg)[None, :].expand(tp.shape[0], -1)), pred)


def box_iop(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray,
            fmt: str = "xyxy") -> torch.Tensor | np.ndarray:
    """(N, M) intersection over the prediction's area."""
    tp, tg = _t(pred, fmt), _t(gt, fmt)
    return _out(_safe_div(_inter(tp, tg), _area(tp)[:, None].expand(-1, tg.shape[0])), pred)


def _per_image(preds, gts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted boxes for {len(gts)} images; pass one prediction per image")
    return list(zip(preds, gts, strict=True))


def maiou(crops: Sequence | np.ndarray | torch.Tensor, gts: Sequence, fmt: str = "xyxy") -> float:
    """Mean over images of aIoU(crop_i, gt_i) (one crop per image; max over the image's gt boxes)."""
    vals = []
    for c, g in _per_image(crops, gts):
        tg = _t(g, fmt)
        vals.append(float(_safe_div(_inter(_t(c, fmt), tg), _area(tg)[None]).max()) if tg.shape[0] else 0.0)
    if not vals:
        raise ValueError("maiou of an empty split (0 images)")
    return float(np.mean(vals))


def miou_box(preds: Sequence | np.ndarray | torch.Tensor, gts: Sequence, fmt: str = "xyxy",
             iou_mode: str = "standard") -> float:
    """Mean over images of max_j IoU(pred_i, gt_ij) (images without gt boxes count 0)."""
    vals = [float(np.max(box_iou(_t(p, fmt), _t(g, fmt), iou_mode=iou_mode).numpy())) if len(g) else 0.0
            for p, g in _per_image(preds, gts)]
    if not vals:
        raise ValueError("miou_box of an empty split (0 images)")
    return float(np.mean(vals))


def corloc(preds: Sequence | np.ndarray | torch.Tensor, gts: Sequence, hard: Sequence | None = None,
           hard_mode: str = "keep", empty_gt: str = "miss", iou_mode: str = "standard", threshold: float = 0.5,
           fmt: str = "xyxy") -> dict[str, float]:
    """CorLoc: fraction of counted images whose one predicted box has IoU >= ``threshold`` with some gt box.

    Args:
        preds: one box (4,) per image.
        gts: per image an (M_i, 4) array of gt boxes (M_i may be 0).
        hard: per image an (M_i,) bool array marking difficult/truncated boxes (``hard_mode="drop"`` removes them
            and skips images left without boxes, LOST's ``--no_hard``); ``keep`` counts all boxes.
        empty_gt: images without gt boxes count as misses (``miss``, upstream) or are skipped (``skip``).
    Returns:
        ``{"corloc", "n_images", "n_hits"}``.
    """
    if hard_mode not in ("keep", "drop") or empty_gt not in ("miss", "skip"):
        raise ValueError(f"hard_mode must be 'keep'|'drop' and empty_gt 'miss'|'skip', got {hard_mode!r}, "
                         f"{empty_gt!r}")
    n_img = n_hit = 0
    for i, (p, g) in enumerate(_per_image(preds, gts)):
        tg = _t(g, fmt) if len(g) else torch.zeros(0, 4, dtype=torch.float64)
        if hard_mode == "drop" and hard is not None:
            keep = ~torch.as_tensor(np.asarray(hard[i], dtype=bool))
            tg = tg[keep]
            if tg.shape[0] == 0:
                continue
        if tg.shape[0] == 0:
            if empty_gt == "skip":
                continue
            n_img += 1
            continue
        n_img += 1
        n_hit += int(float(box_iou(_t(p, fmt), tg, iou_mode=iou_mode).max()) >= threshold)
    if n_img == 0:
        raise ValueError("CorLoc over 0 counted images (empty split, or every image skipped)")
    return {"corloc": n_hit / n_img, "n_images": n_img, "n_hits": n_hit}
