"""Image <-> tensor helpers shared by every pipeline."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor_batch(images: list[np.ndarray] | np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> normalised float (B, 3, H, W) on ``device`` (normalised there)."""
    arr = np.stack(images) if isinstance(images, list) else images
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------ paired image + mask transforms


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _as_pil(image):
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8), "RGB")


class SegTransform:
    """Paired transform of a dataset item (``image`` PIL/uint8 HWC, ``mask`` (H, W) int or ``None``).

    Steps, in order (each optional):

    1. ``resize``: an int ``S`` resizes the **shorter side** to S (aspect kept, ``round``); a pair ``(H, W)``
       resizes to exactly that size. Image bilinear (antialiased), mask nearest.
    2. ``crop``: an int or ``(H, W)`` crop, ``crop_mode="center"`` or ``"random"``; an image smaller than the crop
       is padded bottom/right (image 0, mask ``ignore_index``) first.
    3. ``hflip``: flip probability.

    Boxes (``boxes``, ``[x, y, w, h]``) are scaled, shifted, clipped and flipped along with the pixels (boxes
    cropped away entirely keep zero size). Randomness uses ``generator`` (a ``torch.Generator``) or torch's global
    RNG, which DataLoader seeds per worker. The image comes out as a ``PIL.Image``, the mask as int64.
    """

    def __init__(self, resize: int | tuple[int, int] | None = None, crop: int | tuple[int, int] | None = None,
                 crop_mode: str = "center", hflip: float = 0.0, ignore_index: int = 255,
                 generator: torch.Generator | None = None):
        if crop_mode not in ("center", "random"):
            raise ValueError(f"crop_mode must be 'center' or 'random', got {crop_mode!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        self.resize, self.crop, self.crop_mode, self.hflip = resize, crop, crop_mode, hflip
        self.ignore_index, self.generator = ignore_index, generator

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def __call__(self, item: dict) -> dict:
        from PIL import Image

        item = dict(item)
        img = _as_pil(item["image"])
        mask = item.get("mask")
        boxes = item.get("boxes")
        boxes = None if boxes is None else np.asarray(boxes, np.float32).copy()
        w, h = img.size
        if self.resize is not None:
            if isinstance(self.resize, int):
                s = self.resize / min(h, w)
                nh, nw = max(1, round(h * s)), max(1, round(w * s))
            else:
                nh, nw = _size_hw(self.resize)
            if (nh, nw) != (h, w):
                img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
                if mask is not None:
                    rows = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.int64)
                    cols = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.int64)
                    mask = np.asarray(mask)[rows[:, None], cols[None, :]]
                if boxes is not None:
                    boxes *= np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
                h, w = nh, nw
        if self.crop is not None:
            ch, cw = _size_hw(self.crop)
            if ch > h or cw > w:  # pad bottom/right
                ph, pw = max(ch, h), max(cw, w)
                canvas = Image.new("RGB", (pw, ph))
                canvas.paste(img, (0, 0))
                img = canvas
                if mask is not None:
                    m2 = np.full((ph, pw), self.ignore_index, np.int64)
                    m2[:h, :w] = mask
                    mask = m2
                h, w = ph, pw
            if self.crop_mode == "center":
                top, left = (h - ch) // 2, (w - cw) // 2
            else:
                top = int(self._rand() * (h - ch + 1)) if h > ch else 0
                left = int(self._rand() * (w - cw + 1)) if w > cw else 0
                top, left = min(top, h - ch), min(left, w - cw)
            img = img.crop((left, top, left + cw, top + ch))
            if mask is not None:
                mask = np.asarray(mask)[top:top + ch, left:left + cw]
            if boxes is not None and len(boxes):
                x0 = np.clip(boxes[:, 0] - left, 0, cw)
                y0 = np.clip(boxes[:, 1] - top, 0, ch)
                x1 = np.clip(boxes[:, 0] + boxes[:, 2] - left, 0, cw)
                y1 = np.clip(boxes[:, 1] + boxes[:, 3] - top, 0, ch)
                boxes = np.stack([x0, y0, x1 - x0, y1 - y0], 1).astype(np.float32)
            h, w = ch, cw
        if self.hflip > 0 and self._rand() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if mask is not None:
                mask = np.asarray(mask)[:, ::-1]
            if boxes is not None and len(boxes):
                boxes[:, 0] = w - boxes[:, 0] - boxes[:, 2]
        item["image"] = img
        if mask is not None:
            item["mask"] = np.ascontiguousarray(mask, dtype=np.int64)
        if boxes is not None:
            item["boxes"] = boxes
        return item


def collate(items: list[dict]) -> dict:
    """Stack dataset items into a batch of uint8 tensors (normalise on the device with :func:`to_tensor_batch`).

    Returns ``image`` (B, H, W, 3) uint8, ``mask`` (B, H, W) int64 or ``None``, ``id`` (list[str]), ``label`` (B,)
    int64 if every item has one, ``boxes`` / ``box_labels`` (lists of per-item tensors) if present, and ``bad``:
    ``(id, reason)`` of the items that carried an ``error`` (unreadable files from ``ImageFolder``), which are
    dropped from the batch.
    """
    bad = [(it["id"], it["error"]) for it in items if it.get("error") is not None]
    good = [it for it in items if it.get("error") is None and it.get("image") is not None]
    out: dict = {"id": [it["id"] for it in good], "bad": bad}
    if not good:
        out.update(image=torch.empty(0, 0, 0, 3, dtype=torch.uint8), mask=None)
        return out
    arrs = [np.asarray(it["image"], np.uint8) for it in good]
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"collate: images in a batch differ in size {sorted(shapes)[:3]} (ids {out['id'][:3]}); "
                         f"add a SegTransform(resize=..., crop=...) to the dataset or use batch_size=1")
    out["image"] = torch.from_numpy(np.stack(arrs))
    masks = [it.get("mask") for it in good]
    if all(m is None for m in masks):
        out["mask"] = None
    elif any(m is None for m in masks):
        raise ValueError("collate: some items have masks and some do not")
    else:
        if len({m.shape for m in masks}) > 1:
            raise ValueError(f"collate: masks differ in size {sorted({m.shape for m in masks})[:3]}")
        out["mask"] = torch.from_numpy(np.stack([np.asarray(m, np.int64) for m in masks]))
    if all("label" in it for it in good):
        out["label"] = torch.tensor([int(it["label"]) for it in good], dtype=torch.int64)
    for k in ("boxes", "box_labels"):
        if any(k in it for it in good):
            out[k] = [torch.as_tensor(np.asarray(it[k])) if k in it else None for it in good]
    return out
