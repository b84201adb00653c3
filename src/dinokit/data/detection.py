"""Detection datasets for single-object discovery (CorLoc): VOC07 / VOC12 ``trainval`` and COCO20k, plus writers of
tiny synthetic layouts in the same formats (for tests and demos). See docs/eval/discovery.md.

Items follow the dataset contract of :mod:`dinokit.data.datasets` (``image`` PIL RGB, ``mask`` None, ``id``,
``boxes`` (N, 4) float32 ``[x, y, w, h]`` pixels, ``box_labels`` (N,) int64) plus, per box, ``box_difficult``,
``box_truncated`` and ``box_hard`` (= difficult or truncated) bool arrays.

- :class:`VOCDetection`: ``Annotations/<id>.xml`` + ``ImageSets/Main/<split>.txt`` (+ ``JPEGImages``). VOC corners
  are 1-based inclusive: the box is ``(xmin - 1, ymin - 1, xmax, ymax)``, i.e. ``[xmin - 1, ymin - 1,
  xmax - xmin + 1, ymax - ymin + 1]``. Key ``voc07`` / ``voc12`` from ``year`` or the folder name (VOC2007/VOC2012).
- :class:`COCO20k`: LOST's 19,817-image file list over ``instances_train2014.json``; ``iscrowd`` annotations removed;
  each box ``(x, y, x + w, y + h)`` rounded to integers (round half to even, as Python's ``round``).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import VOC_CLASSES, BaseDataset, Item, Record, _read_list, _require_nonempty
from .images import load_rgb

VOC_YEARS = {"2007": "voc07", "2012": "voc12"}
COCO20K_LIST = "coco_20k_filenames.txt"


# ---------------------------------------------------------------------------------------------------- VOC


def parse_voc_objects(path: str | os.PathLike) -> dict:
    """A VOC ``Annotations/<id>.xml`` -> ``{"names", "boxes" (N, 4) float32 [x, y, w, h], "difficult",
    "truncated" (N,) bool, "size" (H, W) or None}``. Missing ``difficult`` / ``truncated`` tags read as 0."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path} is not valid VOC XML: {err}") from err
    names, boxes, diff, trunc = [], [], [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: an object's bndbox lacks a numeric xmin/ymin/xmax/ymax") from err
        names.append((obj.findtext("name") or "").strip())
        boxes.append([x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1])
        diff.append(int(float(obj.findtext("difficult") or 0)) == 1)
        trunc.append(int(float(obj.findtext("truncated") or 0)) == 1)
    size = None
    if root.find("size") is not None:
        w, h = root.findtext("size/width"), root.findtext("size/height")
        if w and h:
            size = (int(float(h)), int(float(w)))
    return {"names": names, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "difficult": np.asarray(diff, bool), "truncated": np.asarray(trunc, bool), "size": size}


def find_voc_root(root: str | os.PathLike, year: str | None = None) -> Path:
    """The folder holding ``Annotations/`` and ``ImageSets/Main/`` under ``root`` (itself, ``VOC<year>`` or
    ``VOCdevkit/VOC<year>``; both years are tried when ``year`` is None)."""
    root = Path(root)
    years = [str(year)] if year else list(VOC_YEARS)
    cands = [root] + [root / f"VOC{y}" for y in years] + [root / "VOCdevkit" / f"VOC{y}" for y in years]
    for c in cands:
        if (c / "Annotations").is_dir() and (c / "ImageSets" / "Main").is_dir():
            return c
    raise FileNotFoundError(f"no VOC detection layout under {root}: expected Annotations/ and ImageSets/Main/ in "
                            f"{', '.join(str(c) for c in cands)}")


class VOCDetection(BaseDataset):
    """Pascal VOC detection (``trainval``, ``train``, ``val``, ``test`` or any ``ImageSets/Main`` list).

    ``box_labels`` index ``class_names`` (VOC's 21 names with 0 = background, or the root's ``class_names.txt``);
    an object name outside them raises naming the file.
    """

    def __init__(self, root: str | os.PathLike, split: str = "trainval", year: str | None = None,
                 transform: Callable | None = None, min_size: int = 1):
        super().__init__(transform, min_size)
        self.root = find_voc_root(root, year)
        self.split = split
        y = str(year) if year else next((y for y in VOC_YEARS if y in self.root.name), None)
        self.key = VOC_YEARS.get(y, "voc") if y else "voc"
        names_file = self.root / "class_names.txt"
        self.class_names = tuple(_read_list(names_file)) if names_file.is_file() else VOC_CLASSES
        self.num_classes = len(self.class_names)
        index = {n: i for i, n in enumerate(self.class_names)}
        list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            have = sorted(p.stem for p in list_file.parent.glob("*.txt") if "_" not in p.stem)
            raise FileNotFoundError(f"VOC detection split file {list_file} not found; available splits: {have}")
        ids = _read_list(list_file)
        _require_nonempty(ids, split, list_file)
        self.split_file = list_file
        self.flags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in ids:
            xml = self.root / "Annotations" / f"{i}.xml"
            if not xml.is_file():
                raise FileNotFoundError(f"{list_file} lists {i!r} but {xml} does not exist")
            obj = parse_voc_objects(xml)
            bad = sorted({n for n in obj["names"] if n not in index})
            if bad:
                raise ValueError(f"{xml}: object classes {bad} are not among {list(self.class_names)}; add a "
                                 "class_names.txt to the dataset root")
            img = self.root / "JPEGImages" / f"{i}.jpg"
            if not img.is_file() and (self.root / "JPEGImages" / f"{i}.png").is_file():
                img = self.root / "JPEGImages" / f"{i}.png"
            self.records.append(Record(id=i, image=img, boxes=obj["boxes"],
                                       box_labels=np.asarray([index[n] for n in obj["names"]], np.int64)))
            self.flags[i] = (obj["difficult"], obj["truncated"])
        self._check_files()

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        item: Item = {"image": load_rgb(rec.image, self.min_size), "mask": None, "id": rec.id,
                      "boxes": rec.boxes.copy(), "box_labels": rec.box_labels.copy()}
        d, t = self.flags[rec.id]
        item.update(box_difficult=d.copy(), box_truncated=t.copy(), box_hard=d | t)
        return self.transform(item) if self.transform is not None else item


# ---------------------------------------------------------------------------------------------------- COCO20k


def coco_image_id(name: str) -> int:
    """The integer image id of a COCO file name (``train2014/COCO_train2014_000000000009.jpg`` -> 9)."""
    stem = Path(name.strip()).stem
    try:
        return int(stem.split("_")[-1])
    except ValueError as err:
        raise ValueError(f"{name!r} is not a COCO file name (COCO_train2014_<12-digit id>.jpg)") from err


def coco_xyxy_int(bbox: Sequence[float]) -> list[int]:
    """COCO ``[x, y, w, h]`` -> integer ``(x1, y1, x2, y2)``: each of x, y, x + w, y + h rounded half to even."""
    x, y, w, h = (float(v) for v in bbox)
    return [int(round(v)) for v in (x, y, x + w, y + h)]


class COCO20k(BaseDataset):
    """COCO20k: the train2014 images of LOST's file list with their ``instances_train2014`` boxes, crowd removed.

    Layout: ``<root>/{train2014,images/train2014}/<file_name>``, ``<root>/annotations/instances_train2014.json`` and
    the list ``<root>/coco_20k_filenames.txt`` (or ``<root>/datasets/...``; valeoai/LOST ships it), one file name per
    line. ``file_list="all"`` takes every image of the annotation file. Records follow the list order.
    """

    key = "coco20k"

    def __init__(self, root: str | os.PathLike, split: str = "trainval", file_list: str | os.PathLike | None = None,
                 annotations: str | os.PathLike | None = None, transform: Callable | None = None,
                 min_size: int = 1):
        super().__init__(transform, min_size)
        self.root, self.split = Path(root), split
        ann = Path(annotations) if annotations else self.root / "annotations" / "instances_train2014.json"
        if not ann.is_file():
            raise FileNotFoundError(f"COCO20k needs {ann} (COCO instances_train2014 annotations)")
        img_dir = next((d for d in (self.root / "train2014", self.root / "images" / "train2014") if d.is_dir()), None)
        if img_dir is None:
            raise FileNotFoundError(f"no train2014/ or images/train2014/ image folder under {self.root}")
        data = json.loads(ann.read_text())
        cats = sorted(data.get("categories", []), key=lambda c: int(c["id"]))
        self.cat_ids = [int(c["id"]) for c in cats]
        self.class_names = tuple(str(c.get("name", c["id"])) for c in cats)
        self.num_classes = len(self.class_names)
        images = {int(im["id"]): im for im in data["images"]}
        if str(file_list) == "all":
            chosen = sorted(images)
            self.list_file = None
        else:
            lf = Path(file_list) if file_list else next(
                (p for p in (self.root / COCO20K_LIST, self.root / "datasets" / COCO20K_LIST) if p.is_file()), None)
            if lf is None or not lf.is_file():
                raise FileNotFoundError(f"COCO20k file list not found ({file_list or self.root / COCO20K_LIST}); "
                                        "download datasets/coco_20k_filenames.txt from valeoai/LOST into the root, "
                                        "pass file_list=..., or file_list='all'")
            chosen = [coco_image_id(s) for s in lf.read_text().splitlines() if s.strip()]
            missing = [i for i in chosen if i not in images]
            if missing:
                raise ValueError(f"{lf} lists {len(missing)} image(s) absent from {ann} (first ids: {missing[:3]})")
            self.list_file = lf
        _require_nonempty(chosen, split, self.list_file or ann)
        boxes: dict[int, list] = {i: [] for i in chosen}
        labels: dict[int, list] = {i: [] for i in chosen}
        cat_index = {c: k for k, c in enumerate(self.cat_ids)}
        self.n_crowd = 0
        for a in data.get("annotations", []):
            i = int(a["image_id"])
            if i not in boxes:
                continue
            if int(a.get("iscrowd", 0)) == 1:
                self.n_crowd += 1
                continue
            x1, y1, x2, y2 = coco_xyxy_int(a["bbox"])
            boxes[i].append([x1, y1, x2 - x1, y2 - y1])
            labels[i].append(cat_index.get(int(a["category_id"]), -1))
        for i in chosen:
            self.records.append(Record(id=Path(images[i]["file_name"]).stem, image=img_dir / images[i]["file_name"],
                                       boxes=np.asarray(boxes[i], np.float32).reshape(-1, 4),
                                       box_labels=np.asarray(labels[i], np.int64)))
        self._check_files()

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        n = len(rec.boxes)
        item: Item = {"image": load_rgb(rec.image, self.min_size), "mask": None, "id": rec.id,
                      "boxes": rec.boxes.copy(), "box_labels": rec.box_labels.copy(),
                      "box_difficult": np.zeros(n, bool), "box_truncated": np.zeros(n, bool),
                      "box_hard": np.zeros(n, bool)}
        return self.transform(item) if self.transform is not None else item


def detect_detection_layout(root: str | os.PathLike) -> str | None:
    """``"voc"`` (Annotations + ImageSets/Main), ``"coco20k"`` (annotations/instances_train2014.json) or None."""
    r = Path(root)
    if (r / "annotations" / "instances_train2014.json").is_file():
        return "coco20k"
    try:
        find_voc_root(r)
        return "voc"
    except FileNotFoundError:
        return None


def open_detection(path: str | os.PathLike, split: str = "trainval", **kwargs) -> BaseDataset:
    """A detection dataset by layout: VOC detection, COCO20k, or (names ``synthetic`` / ``synthetic-fine``) the
    in-memory synthetic scenes (``n``, ``size``, ``seed`` kwargs; their instance boxes, no hard flags)."""
    s = str(path)
    if s in ("synthetic", "synthetic-fine"):
        from .datasets import SyntheticDataset

        n, size, seed = int(kwargs.pop("n", 64)), kwargs.pop("size", (96, 96)), int(kwargs.pop("seed", 0))
        return SyntheticDataset(n, tuple(size), seed, s.endswith("-fine"), **kwargs)
    kind = detect_detection_layout(path)
    if kind == "coco20k":
        return COCO20k(path, split, **kwargs)
    if kind == "voc":
        return VOCDetection(path, split, **kwargs)
    raise FileNotFoundError(f"{path} is neither a VOC detection root (Annotations/ + ImageSets/Main/) nor a COCO20k "
                            "root (annotations/instances_train2014.json); pass 'synthetic' for the embedded scenes")


# ---------------------------------------------------------------------------------------------------- writers


def _png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _xml(image_id: str, h: int, w: int, objs: list[tuple[str, list[int], bool, bool]]) -> str:
    parts = []
    for name, (x0, y0, x1, y1), diff, trunc in objs:
        parts.append(f"  <object>\n    <name>{name}</name>\n    <pose>Unspecified</pose>\n"
                     f"    <truncated>{int(trunc)}</truncated>\n    <difficult>{int(diff)}</difficult>\n"
                     f"    <bndbox>\n      <xmin>{x0}</xmin>\n      <ymin>{y0}</ymin>\n      <xmax>{x1}</xmax>\n"
                     f"      <ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n")
    return (f"<annotation>\n  <folder>dinokit-synthetic</folder>\n  <filename>{image_id}.png</filename>\n"
            f"  <size>\n    <width>{w}</width>\n    <height>{h}</height>\n    <depth>3</depth>\n  </size>\n"
            f"{''.join(parts)}</annotation>\n")


def write_voc_detection_layout(out: str | os.PathLike, n: int, size: tuple[int, int] = (96, 96), seed: int = 0,
                               difficult_area: float = 0.02, overwrite: bool = False) -> dict:
    """Render synthetic scenes ``0..n-1`` of ``seed`` as a VOC detection layout at ``out`` (PNG images).

    Flags per box: ``truncated`` when the box touches the image border, ``difficult`` when its area is below
    ``difficult_area`` of the image. Splits ``trainval`` (all), ``train`` (first half), ``val`` (the rest).
    Returns a summary with the box and hard-box counts. Written atomically, byte-identical for equal arguments.
    """
    from . import synthetic as syn
    from .layouts import atomic_dir, class_names

    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    names = class_names(False)
    ids, n_boxes, n_diff, n_trunc = [], 0, 0, 0
    with atomic_dir(out, overwrite) as tmp:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        for i in range(n):
            sc = syn.render_scene(seed, i, tuple(size), False)
            h, w = sc.mask.shape
            objs = []
            for (x, y, bw, bh), c in zip(sc.boxes.astype(int).tolist(), sc.instance_labels.tolist()):
                trunc = x == 0 or y == 0 or x + bw == w or y + bh == h
                diff = bw * bh < difficult_area * h * w
                objs.append((names[c + 1], [x + 1, y + 1, x + bw, y + bh], diff, trunc))
                n_boxes, n_diff, n_trunc = n_boxes + 1, n_diff + int(diff), n_trunc + int(trunc)
            (tmp / "JPEGImages" / f"{sc.image_id}.png").write_bytes(_png(sc.image))
            (tmp / "Annotations" / f"{sc.image_id}.xml").write_text(_xml(sc.image_id, h, w, objs))
            ids.append(sc.image_id)
        half = max(1, n // 2)
        for split, part in (("trainval", ids), ("train", ids[:half]), ("val", ids[half:] or ids[:1])):
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in part))
        (tmp / "class_names.txt").write_text("".join(f"{c}\n" for c in names))
    return {"layout": "voc-detection", "root": str(out), "n": n, "size": list(size), "seed": seed,
            "boxes": n_boxes, "difficult": n_diff, "truncated": n_trunc}


def write_coco_layout(out: str | os.PathLike, n: int, size: tuple[int, int] = (96, 96), seed: int = 0,
                      crowd_every: int = 2, n_listed: int | None = None, overwrite: bool = False) -> dict:
    """Render synthetic scenes ``0..n-1`` as a COCO train2014-style layout with a COCO20k-style file list.

    Image ``i`` has id ``i + 1`` and file ``train2014/COCO_train2014_<12-digit id>.png``; each instance box is
    stored as ``[x + 0.4, y, w, h]`` (rounding gives back the exact scene box); every ``crowd_every``-th image
    also gets an ``iscrowd`` box covering the whole image. The list ``coco_20k_filenames.txt`` names the first
    ``n_listed`` images (default: all but the last).
    """
    from . import synthetic as syn
    from .layouts import atomic_dir

    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    n_listed = max(1, n - 1) if n_listed is None else n_listed
    images, anns, names = [], [], []
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "train2014").mkdir()
        (tmp / "annotations").mkdir()
        for i in range(n):
            sc = syn.render_scene(seed, i, tuple(size), False)
            h, w = sc.mask.shape
            fname = f"COCO_train2014_{i + 1:012d}.png"
            (tmp / "train2014" / fname).write_bytes(_png(sc.image))
            images.append({"id": i + 1, "file_name": fname, "height": h, "width": w})
            names.append(f"train2014/{fname}")
            for (x, y, bw, bh), c in zip(sc.boxes.astype(float).tolist(), sc.instance_labels.tolist()):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "iscrowd": 0,
                             "bbox": [x + 0.4, y, bw, bh], "area": bw * bh})
            if crowd_every > 0 and i % crowd_every == 0:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                             "bbox": [0.0, 0.0, float(w), float(h)], "area": float(w * h)})
        cats = [{"id": c + 1, "name": s, "supercategory": "shape"} for c, s in enumerate(syn.SHAPE_CLASSES)]
        (tmp / "annotations" / "instances_train2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
        (tmp / COCO20K_LIST).write_text("".join(f"{s}\n" for s in names[:n_listed]))
    return {"layout": "coco20k", "root": str(out), "n": n, "n_listed": n_listed, "size": list(size), "seed": seed,
            "annotations": len(anns), "crowd": sum(a["iscrowd"] for a in anns)}
