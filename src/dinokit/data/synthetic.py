"""The embedded synthetic benchmark: seeded procedural scenes with exact ground truth.

Scenes are textured backgrounds with 1-3 objects from a fixed set of shape classes, in random
colours, sizes and positions (position is independent of class). Every scene comes with an exact
semantic mask (0 = background, c + 1 = shape class c, 255 = never used), instance boxes
``[x, y, w, h]`` in pixels and an image label (the class of the largest object).

The fine-grained variant draws one main object (always the same shape) whose class is given only by
a small mark on it, plus optional distractors of another shape, so that cropping on the object
matters for classification.

Rendering is pure numpy and deterministic: sample ``i`` of seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "cross", "ring", "diamond")
MARK_CLASSES: tuple[str, ...] = ("none", "dot", "bar", "slash", "corner")
FINE_MAIN_SHAPE = "square"
FINE_DISTRACTOR_SHAPE = "disk"


@dataclass
class Scene:
    """One rendered scene.

    image: (H, W, 3) uint8 RGB; mask: (H, W) uint8 semantic labels (0 = background);
    boxes: (N, 4) float32 ``[x, y, w, h]`` per instance; instance_labels: (N,) int64 class ids
    (0-based, background excluded); label: image-level class id (0-based).
    """

    image: np.ndarray
    mask: np.ndarray
    boxes: np.ndarray
    instance_labels: np.ndarray
    label: int
    image_id: str
    instance_masks: list[np.ndarray] = field(default_factory=list, repr=False)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with centre (cy, cx) and half-size r on the pixel-centre grid."""
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2.0)
    if shape == "cross":
        arm = r / 3.0
        return ((np.abs(dy) <= r) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= r) & (np.abs(dy) <= arm))
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPE_CLASSES}")


def _mark_mask(mark: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """A small mark inside a square of half-size r (the fine-grained cue)."""
    dy, dx = yy - cy, xx - cx
    s = 0.28 * r
    if mark == "none":
        return np.zeros_like(yy, dtype=bool)
    if mark == "dot":
        return dy**2 + dx**2 <= s**2
    if mark == "bar":
        return (np.abs(dy) <= 0.3 * s) & (np.abs(dx) <= 1.6 * s)
    if mark == "slash":
        return (np.abs(dy - dx) <= 0.45 * s) & (np.abs(dx) <= 1.4 * s)
    if mark == "corner":
        return (dy <= -0.45 * r) & (dy >= -0.85 * r) & (dx <= -0.45 * r) & (dx >= -0.85 * r)
    raise ValueError(f"unknown mark {mark!r}; choose from {MARK_CLASSES}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth textured background: a random colour gradient plus low-frequency sinusoids and noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    out = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fy, fx = rng.uniform(0.5, 4.0, size=2) * 2 * np.pi / np.array([h, w])
        ph = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(10, 35)
        out[..., c] = base[c] + amp * np.sin(fy * yy + fx * xx + ph)
    out += rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    return out


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A saturated colour at least a minimum distance from the local background colour."""
    for _ in range(20):
        col = rng.uniform(0, 255, size=3).astype(np.float32)
        if np.linalg.norm(col - avoid) > 90:
            return col
    return 255.0 - avoid


def render_scene(seed: int, index: int, size: tuple[int, int] = (96, 96), fine_grained: bool = False,
                 max_objects: int = 3) -> Scene:
    """Render scene ``index`` of benchmark ``seed`` at ``size = (H, W)`` pixels.

    Objects are placed independently of their class; later objects may occlude earlier ones and the
    mask, boxes and instance masks reflect the visible pixels exactly.
    """
    h, w = size
    if h < 16 or w < 16:
        raise ValueError(f"synthetic scenes need at least 16x16 pixels, got {h}x{w}")
    rng = np.random.default_rng([seed, index, int(fine_grained)])
    img = _background(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mask = np.zeros((h, w), np.uint8)
    inst_id = np.full((h, w), -1, np.int16)
    n_obj = int(rng.integers(1, max_objects + 1))
    m = min(h, w)
    classes: list[int] = []
    specs = []
    for k in range(n_obj):
        main = k == 0
        if fine_grained:
            shape = FINE_MAIN_SHAPE if main else FINE_DISTRACTOR_SHAPE
            cls = int(rng.integers(0, len(MARK_CLASSES))) if main else 0
            r = rng.uniform(0.18, 0.3) * m if main else rng.uniform(0.06, 0.1) * m
        else:
            cls = int(rng.integers(0, len(SHAPE_CLASSES)))
            shape = SHAPE_CLASSES[cls]
            r = rng.uniform(0.12, 0.26) * m if main else rng.uniform(0.08, 0.2) * m
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        specs.append((shape, cls, cy, cx, r, main))
    # draw large first so the main object is rarely fully hidden; main object last in fine-grained mode
    order = list(range(n_obj))[::-1] if fine_grained else list(range(n_obj))
    for k in order:
        shape, cls, cy, cx, r, main = specs[k]
        sm = _shape_mask(shape, yy, xx, cy, cx, r)
        col = _colour(rng, img[int(cy), int(cx)])
        shade = 1.0 + 0.15 * ((yy - cy) / max(r, 1.0))[..., None]
        img = np.where(sm[..., None], col[None, None] * shade, img)
        if fine_grained and main:
            mk = _mark_mask(MARK_CLASSES[cls], yy, xx, cy, cx, r) & sm
            img = np.where(mk[..., None], (255.0 - col)[None, None], img)
        mask[sm] = (cls + 1) if not fine_grained else (1 if main else 2)
        inst_id[sm] = k
    boxes, labels, inst_masks = [], [], []
    for k in range(n_obj):
        im = inst_id == k
        if not im.any():
            continue
        ys, xs = np.nonzero(im)
        boxes.append([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        labels.append(specs[k][1])
        inst_masks.append(im)
        classes.append(specs[k][1])
    areas = [im.sum() for im in inst_masks]
    label = specs[0][1] if fine_grained else labels[int(np.argmax(areas))]
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(image=image, mask=mask, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                 instance_labels=np.asarray(labels, np.int64), label=int(label),
                 image_id=f"{'fine' if fine_grained else 'syn'}_{seed}_{index:06d}", instance_masks=inst_masks)


def num_classes(fine_grained: bool = False) -> int:
    """Image-level classes: shapes (coarse) or marks (fine-grained)."""
    return len(MARK_CLASSES) if fine_grained else len(SHAPE_CLASSES)


def num_seg_classes(fine_grained: bool = False) -> int:
    """Semantic classes including background: 1 + shapes, or {bg, main, distractor}."""
    return 3 if fine_grained else 1 + len(SHAPE_CLASSES)


class SyntheticScenes:
    """An indexable, lazily rendered benchmark: ``scenes[i]`` is a :class:`Scene`."""

    def __init__(self, n: int, size: tuple[int, int] = (96, 96), seed: int = 0, fine_grained: bool = False):
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.n, self.size, self.seed, self.fine_grained = n, tuple(size), seed, fine_grained

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return render_scene(self.seed, i, self.size, self.fine_grained)
