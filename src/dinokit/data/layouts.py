"""Write the synthetic benchmark to disk in the standard layouts, so the real loaders read it.

- :func:`write_voc_layout`: Pascal-VOC-style segmentation layout::

      <out>/JPEGImages/<id>.jpg          RGB images (JPEG quality 95, 4:4:4; ``image_format="png"`` for exact pixels)
      <out>/SegmentationClass/<id>.png   palette PNG of class indices (VOC colour map), 0 = background
      <out>/SegmentationObject/<id>.png  palette PNG of instance indices 1..N in box order, 0 = background
      <out>/Annotations/<id>.xml         VOC XML boxes (1-based inclusive corners)
      <out>/ImageSets/Segmentation/{train,val,trainaug}.txt   (trainaug = train: there is no SBD extra set)
      <out>/class_names.txt              one class name per line (line i = class i); replaces VOC's 21 names

  The synthetic masks have no void (255) pixels: the rendering is exact. JPEG is the default because it is what
  the real VOC layout holds; the masks and boxes are exact either way.
- :func:`write_cub_layout`: CUB-200-2011-style classification layout (fine-grained variant by default)::

      <out>/images/<NNN.class>/<id>.jpg, images.txt, image_class_labels.txt, train_test_split.txt,
      bounding_boxes.txt (x y w h of the labelled object), classes.txt

  ``images.txt`` is ordered by class then scene index, as in CUB (so ``dinov2`` splits behave alike).

Writing goes to a temporary folder next to ``out`` that is renamed onto ``out`` at the end (atomic), and is
deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from . import synthetic as syn


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: (n, 3) uint8, class i's colour from the bits of i (255 -> (224, 224, 192))."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        pal[i] = rgb
    return pal


def class_names(fine_grained: bool = False) -> tuple[str, ...]:
    """Semantic class names of the synthetic segmentation masks (index = mask value)."""
    if fine_grained:
        return ("background", f"main_{syn.FINE_MAIN_SHAPE}", f"distractor_{syn.FINE_DISTRACTOR_SHAPE}")
    return ("background", *syn.SHAPE_CLASSES)


def image_class_names(fine_grained: bool = False) -> tuple[str, ...]:
    """Image-level class names (the ``label`` of a scene)."""
    return syn.MARK_CLASSES if fine_grained else syn.SHAPE_CLASSES


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _image_bytes(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    img = Image.fromarray(arr, "RGB")
    if fmt == "png":
        return _png_bytes(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def _palette_png(mask: np.ndarray) -> bytes:
    im = Image.fromarray(mask.astype(np.uint8), "P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    return _png_bytes(im)


def _voc_xml(image_id: str, filename: str, h: int, w: int, boxes: np.ndarray, labels: list[str]) -> str:
    objs = []
    for (x, y, bw, bh), name in zip(boxes.tolist(), labels):
        x0, y0 = int(round(x)) + 1, int(round(y)) + 1
        x1, y1 = int(round(x + bw)), int(round(y + bh))
        objs.append(f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n"
                    f"    <difficult>0</difficult>\n    <bndbox>\n      <xmin>{x0}</xmin>\n      <ymin>{y0}</ymin>\n"
                    f"      <xmax>{x1}</xmax>\n      <ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n")
    return (f"<annotation>\n  <folder>dinokit-synthetic</folder>\n  <filename>{filename}</filename>\n"
            f"  <source>\n    <database>dinokit synthetic benchmark</database>\n  </source>\n"
            f"  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>3</depth>\n  </size>\n"
            f"  <segmented>1</segmented>\n{''.join(objs)}</annotation>\n")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` (removed on failure)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..io import make_temp_dir  # mode of a plain mkdir (mkdtemp's 0700 would survive the rename)

    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.")
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_counts(n_train: int, n_val: int) -> None:
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need at least one train and one val image, got n_train={n_train}, n_val={n_val}")


def write_voc_layout(out: str | os.PathLike, n_train: int, n_val: int, size: tuple[int, int] = (96, 96),
                     seed: int = 0, fine_grained: bool = False, image_format: str = "jpg", jpeg_quality: int = 95,
                     overwrite: bool = False) -> dict:
    """Render scenes ``0..n_train+n_val-1`` of ``seed`` into a VOC-style layout at ``out``; returns a summary.

    Train = the first ``n_train`` scene indices, val = the next ``n_val``; ids are the scene ids.
    """
    _check_counts(n_train, n_val)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    names = class_names(fine_grained)
    inst_names = image_class_names(fine_grained)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    with atomic_dir(out, overwrite) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        for i in range(n_train + n_val):
            sc = syn.render_scene(seed, i, tuple(size), fine_grained)
            h, w = sc.mask.shape
            (tmp / "JPEGImages" / f"{sc.image_id}.{image_format}").write_bytes(
                _image_bytes(sc.image, image_format, jpeg_quality))
            (tmp / "SegmentationClass" / f"{sc.image_id}.png").write_bytes(_palette_png(sc.mask))
            inst = np.zeros((h, w), np.uint8)
            for k, im in enumerate(sc.instance_masks):
                inst[im] = k + 1
            (tmp / "SegmentationObject" / f"{sc.image_id}.png").write_bytes(_palette_png(inst))
            if fine_grained:  # box names = semantic class of the instance (main object first)
                labels = [names[1]] + [names[2]] * (len(sc.boxes) - 1)
            else:
                labels = [inst_names[c] for c in sc.instance_labels.tolist()]
            (tmp / "Annotations" / f"{sc.image_id}.xml").write_text(
                _voc_xml(sc.image_id, f"{sc.image_id}.{image_format}", h, w, sc.boxes, labels))
            splits["train" if i < n_train else "val"].append(sc.image_id)
        sets = tmp / "ImageSets" / "Segmentation"
        for split, ids in {**splits, "trainaug": splits["train"]}.items():
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (tmp / "class_names.txt").write_text("".join(f"{n}\n" for n in names))
    return {"layout": "voc", "root": str(out), "n_train": n_train, "n_val": n_val, "size": list(size), "seed": seed,
            "fine_grained": fine_grained, "image_format": image_format, "class_names": list(names),
            "num_classes": len(names)}


def write_cub_layout(out: str | os.PathLike, n_train: int, n_test: int, size: tuple[int, int] = (96, 96),
                     seed: int = 0, fine_grained: bool = True, image_format: str = "jpg", jpeg_quality: int = 95,
                     overwrite: bool = False) -> dict:
    """Render scenes ``0..n_train+n_test-1`` of ``seed`` into a CUB-style layout at ``out``; returns a summary.

    Scene indices ``< n_train`` are official train (``train_test_split`` 1). Each image's label is the scene
    label and its box the labelled object's visible extent (fine-grained: the main object; coarse: the largest).
    """
    _check_counts(n_train, n_test)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    names = image_class_names(fine_grained)
    dirs = [f"{k + 1:03d}.{n}" for k, n in enumerate(names)]
    rows = []
    with atomic_dir(out, overwrite) as tmp:
        for d in dirs:
            (tmp / "images" / d).mkdir(parents=True)
        for i in range(n_train + n_test):
            sc = syn.render_scene(seed, i, tuple(size), fine_grained)
            if fine_grained:
                box = sc.boxes[0]
            else:
                areas = [m.sum() for m in sc.instance_masks]
                box = sc.boxes[int(np.argmax(areas))]
            rel = f"{dirs[sc.label]}/{sc.image_id}.{image_format}"
            (tmp / "images" / rel).write_bytes(_image_bytes(sc.image, image_format, jpeg_quality))
            rows.append((sc.label, i, rel, int(i < n_train), box))
        rows.sort(key=lambda r: (r[0], r[1]))
        (tmp / "images.txt").write_text("".join(f"{k + 1} {r[2]}\n" for k, r in enumerate(rows)))
        (tmp / "image_class_labels.txt").write_text("".join(f"{k + 1} {r[0] + 1}\n" for k, r in enumerate(rows)))
        (tmp / "train_test_split.txt").write_text("".join(f"{k + 1} {r[3]}\n" for k, r in enumerate(rows)))
        (tmp / "bounding_boxes.txt").write_text("".join(
            f"{k + 1} {r[4][0]:.1f} {r[4][1]:.1f} {r[4][2]:.1f} {r[4][3]:.1f}\n" for k, r in enumerate(rows)))
        (tmp / "classes.txt").write_text("".join(f"{k + 1} {d}\n" for k, d in enumerate(dirs)))
    counts = np.bincount([r[0] for r in rows], minlength=len(names)).tolist()
    return {"layout": "cub", "root": str(out), "n_train": n_train, "n_test": n_test, "size": list(size), "seed": seed,
            "fine_grained": fine_grained, "image_format": image_format, "class_names": dirs,
            "num_classes": len(names), "images_per_class": counts}


def summary_json(summaries: list[dict]) -> str:
    """Deterministic JSON text of layout summaries."""
    return json.dumps({"layouts": summaries}, indent=2, sort_keys=True) + "\n"
