"""Dataset loaders for the real on-disk layouts (and the synthetic benchmark, which writes the same layouts).

Every dataset returns items as dicts:

- ``image``: ``PIL.Image`` RGB (read by :func:`dinokit.data.images.load_rgb`);
- ``mask``: ``np.ndarray (H, W) int64`` of class ids in ``[0, num_classes)`` plus ``ignore_index``
  (255 for every dataset except ADE20K-151, whose ``ignore_index`` is 0 = "other"), or ``None``;
- ``id``: ``str``; optional ``label`` (``int``, image class) and ``boxes`` (``np.ndarray (N, 4) float32``
  ``[x, y, w, h]`` in pixels, top-left corner + size) with ``box_labels`` (``(N,) int64``).

Every dataset has ``key`` (the protocol name used in result keys, e.g. ``voc``), ``num_classes``,
``class_names``, ``ignore_index``, ``ids``, ``__len__`` and an optional ``transform`` applied to the item
dict (see :mod:`dinokit.data.transforms`). No model ever runs in ``__getitem__``.

Masks are validated on every read: a label outside the class set raises :class:`MaskLabelError` naming the
file and the bad values. An empty split raises naming the split file.

Layouts (``root`` may point at the folder shown or at a parent that contains it):

- ``VOCSegmentation``: ``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
  SegmentationClassAug/<id>.png, Annotations/<id>.xml, ImageSets/Segmentation/<split>.txt}``. Masks are palette
  or grayscale PNGs of class indices (0 background .. 20, 255 void). ``trainaug`` reads
  ``ImageSets/Segmentation/trainaug.txt`` (or ``train_aug.txt``, ``ImageSets/SegmentationAug/train_aug.txt``)
  with masks from ``SegmentationClassAug`` (next to or above ``VOC2012``); without a list file it is every
  ``SegmentationClassAug`` mask not in ``val``. An optional ``class_names.txt`` (one name per line, line i =
  class i) replaces the 21 VOC names; the synthetic layout writes one. Images may also be ``.png``.
- ``CocoStuff``: ``{images/}{train,val}2017/<12-digit id>.jpg`` and ``annotations/``. ``stuff15`` reads the
  stuff pixel maps ``annotations/stuff_<split>2017_pixelmaps/<id>.png`` (ids 92-182 -> supercategory, 0 and
  183 -> 255) with categories from ``annotations/stuff_<split>2017.json``; ``things12`` reads the panoptic PNGs
  ``annotations/panoptic_<split>2017/<id>.png`` with ``annotations/panoptic_<split>2017.json`` (thing segments
  -> supercategory; stuff and unlabelled -> 255). Both also read the ``stuffthingmaps_trainval2017/<split>2017``
  maps (pixel = category id - 1, 255 unlabelled) when present instead. Classes are the supercategory names
  sorted alphabetically, taken from the category JSON (``instances_``, ``panoptic_`` or ``stuff_`` file).
- ``ADE20K``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/<id>.{jpg,png}``; 151 classes with
  0 = "other" as the ignore index, or ``reduce_zero_label=True``: labels - 1, 0 -> 255, 150 classes. Names
  from ``objectInfo150.txt``/``.csv`` when present.
- ``Cityscapes``: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; labelIds -> 19 trainIds, everything else 255.
- ``CUB200``: ``CUB_200_2011/{images/<class>/<file>, images.txt, image_class_labels.txt, train_test_split.txt,
  bounding_boxes.txt, classes.txt}``; image labels (class - 1) and one box per image; split modes
  ``official``, ``dinov2`` (= ``dinov2_consistent``) and ``random70`` (see :func:`cub_split_ids`).
- ``ImageFolder``: any folder of images, ids = relative POSIX paths; bad files are collected, not raised.
"""

from __future__ import annotations

import json
import os
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, BadImageError, list_images, load_rgb

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
#: Cityscapes labelIds that become trainIds 0..18, in order (all other labelIds -> 255).
CITYSCAPES_TRAIN_LABEL_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32,
                                               33)

Item = dict


class MaskLabelError(ValueError):
    """A mask holds labels outside the dataset's class set."""

    def __init__(self, path: str | os.PathLike, bad_values: Sequence[int], expected: str):
        self.path, self.bad_values = str(path), sorted(int(v) for v in bad_values)
        shown = self.bad_values[:20]
        more = f" (+{len(self.bad_values) - 20} more)" if len(self.bad_values) > 20 else ""
        super().__init__(f"mask {self.path} has labels {shown}{more} outside the class set ({expected}); "
                         f"check that it is a class-index PNG of this dataset (not an RGB colour rendering) "
                         f"and that the dataset/variant is the right one")


@dataclass
class Record:
    """One sample on disk: its id, image file, optional mask file, label and boxes."""

    id: str
    image: Path
    mask: Path | None = None
    label: int | None = None
    boxes: np.ndarray | None = None
    box_labels: np.ndarray | None = None
    extra: object = None


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A class-index PNG (palette ``P``, ``L`` or 16-bit) -> (H, W) int64 of the raw stored values."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(f"label image {p} has mode {im.mode}; expected a single-channel class-index PNG "
                                 f"(palette or grayscale), not a colour rendering")
            return np.asarray(im).astype(np.int64)
    except (OSError, SyntaxError) as err:
        raise BadImageError(p, f"unreadable label PNG ({err})") from err


def _lut_map(raw: np.ndarray, lut: np.ndarray, path: Path, expected: str) -> np.ndarray:
    """Map raw values through ``lut`` (entries -1 = invalid); raise :class:`MaskLabelError` on invalid values."""
    vals = np.unique(raw)
    bad = vals[(vals < 0) | (vals >= len(lut))]
    ok = vals[(vals >= 0) & (vals < len(lut))]
    bad = np.concatenate([bad, ok[lut[ok] < 0]])
    if bad.size:
        raise MaskLabelError(path, bad.tolist(), expected)
    return lut[raw]


def _read_list(path: Path) -> list[str]:
    return [ln.strip().split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _require_nonempty(ids: Sequence, split: str, source: str | Path) -> None:
    if len(ids) == 0:
        raise ValueError(f"split {split!r} is empty: {source} lists no images; check the split name and the file")


def _find_dir(root: Path, *candidates: str) -> Path | None:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None


class BaseDataset(Dataset):
    """Common machinery: records -> item dicts, mask mapping/validation, transform."""

    key: str = "dataset"
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    ignore_index: int = 255

    def __init__(self, transform: Callable[[Item], Item] | None = None, min_size: int = 1):
        self.transform = transform
        self.min_size = min_size
        self.records: list[Record] = []

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _expected(self) -> str:
        return f"0..{self.num_classes - 1} and ignore {self.ignore_index} for {type(self).__name__}"

    def _lut(self) -> np.ndarray:
        """raw value -> class id (or ignore); -1 = invalid. Default: identity on the classes, 255 -> ignore."""
        lut = np.full(256, -1, np.int64)
        lut[: self.num_classes] = np.arange(self.num_classes)
        lut[255] = self.ignore_index
        return lut

    def load_mask(self, rec: Record) -> np.ndarray | None:
        """The validated (H, W) int64 mask of ``rec`` (``None`` if the dataset has no masks)."""
        if rec.mask is None:
            return None
        if not hasattr(self, "_lut_cache"):
            self._lut_cache = self._lut()
        return _lut_map(read_label_png(rec.mask), self._lut_cache, rec.mask, self._expected())

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        image = load_rgb(rec.image, self.min_size)
        item: Item = {"image": image, "mask": self.load_mask(rec), "id": rec.id}
        if item["mask"] is not None and item["mask"].shape != (image.height, image.width):
            raise ValueError(f"mask {rec.mask} is {item['mask'].shape[1]}x{item['mask'].shape[0]} but image "
                             f"{rec.image} is {image.width}x{image.height}; they must have the same size")
        if rec.label is not None:
            item["label"] = rec.label
        if rec.boxes is not None:  # copies: a transform or caller may modify them in place
            item["boxes"] = rec.boxes.copy()
            if rec.box_labels is not None:
                item["box_labels"] = rec.box_labels.copy()
        return self.transform(item) if self.transform is not None else item

    def _check_files(self) -> None:
        missing = [str(r.image) for r in self.records if not r.image.is_file()]
        missing += [str(r.mask) for r in self.records if r.mask is not None and not r.mask.is_file()]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__}: {len(missing)} listed files are missing, e.g. "
                                    f"{missing[:3]}; check the dataset root and that the download is complete")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, n={len(self)}, classes={self.num_classes})"


# ----------------------------------------------------------------------------------------------- VOC


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(f"no Pascal VOC layout under {root}: expected JPEGImages/ in {root}, {root}/VOC2012 or "
                            f"{root}/VOCdevkit/VOC2012")


def parse_voc_xml(path: str | os.PathLike, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """VOC ``Annotations/<id>.xml`` -> boxes (N, 4) float32 ``[x, y, w, h]`` (0-based) and labels (N,) int64.

    VOC stores 1-based inclusive corners: ``x = xmin - 1``, ``w = xmax - xmin + 1``.
    """
    tree = ET.parse(path)
    boxes, labels = [], []
    index = {n: i for i, n in enumerate(class_names)}
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x0, y0, x1, y1 = (float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1])
        if name not in index:
            raise ValueError(f"{path}: object class {name!r} is not one of {list(class_names)}")
        labels.append(index[name])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


class VOCSegmentation(BaseDataset):
    """Pascal VOC 2012 semantic segmentation (``train``, ``val``, ``trainaug``, or any ``ImageSets`` list).

    Items carry ``boxes``/``box_labels`` (object classes 1..20 in class-id space) when ``Annotations/<id>.xml``
    exists.
    """

    key = "voc"

    def __init__(self, root: str | os.PathLike, split: str = "val", transform: Callable | None = None,
                 min_size: int = 1, load_boxes: bool = True):
        super().__init__(transform, min_size)
        self.root = _voc_root(Path(root))
        self.split = split
        names_file = self.root / "class_names.txt"
        self.class_names = tuple(_read_list(names_file)) if names_file.is_file() else VOC_CLASSES
        self.num_classes = len(self.class_names)
        seg_dir = self.root / "SegmentationClass"
        sets = self.root / "ImageSets" / "Segmentation"
        if split == "trainaug":
            aug = _find_dir(self.root, "SegmentationClassAug", "../SegmentationClassAug")
            seg_dir = aug if aug is not None else seg_dir
            lists = [sets / "trainaug.txt", sets / "train_aug.txt",
                     self.root / "ImageSets" / "SegmentationAug" / "train_aug.txt"]
            list_file = next((f for f in lists if f.is_file()), None)
            if list_file is not None:
                ids = _read_list(list_file)
            elif aug is not None:
                val = set(_read_list(sets / "val.txt")) if (sets / "val.txt").is_file() else set()
                ids = sorted(p.stem for p in aug.glob("*.png") if p.stem not in val)
                list_file = aug
            else:
                raise FileNotFoundError(f"VOC trainaug needs {lists[0]} or a SegmentationClassAug/ folder next to "
                                        f"{self.root}; download SBD's SegmentationClassAug")
        else:
            list_file = sets / f"{split}.txt"
            if not list_file.is_file():
                have = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
                raise FileNotFoundError(f"VOC split file {list_file} not found; available splits: {have}")
            ids = _read_list(list_file)
        _require_nonempty(ids, split, list_file)
        self.split_file = Path(list_file)
        for i in ids:
            img = self.root / "JPEGImages" / f"{i}.jpg"
            if not img.is_file() and (self.root / "JPEGImages" / f"{i}.png").is_file():
                img = self.root / "JPEGImages" / f"{i}.png"
            rec = Record(id=i, image=img, mask=seg_dir / f"{i}.png")
            xml = self.root / "Annotations" / f"{i}.xml"
            if load_boxes and xml.is_file():
                rec.boxes, rec.box_labels = parse_voc_xml(xml, self.class_names)
            self.records.append(rec)
        self._check_files()


# ---------------------------------------------------------------------------------------------- COCO


def _is_thing(c: dict) -> bool:
    """COCO thing category: the panoptic ``isthing`` flag, else ids 1..91."""
    return c.get("isthing", 1 if int(c["id"]) <= 91 else 0) == 1


def _coco_supercategories(categories: list[dict], keep: Callable[[dict], bool]) -> tuple[list[str], dict[int, int]]:
    """Sorted supercategory names of the kept categories and the map category id -> supercategory index."""
    kept = [c for c in categories if keep(c)]
    names = sorted({c["supercategory"] for c in kept})
    index = {n: i for i, n in enumerate(names)}
    return names, {int(c["id"]): index[c["supercategory"]] for c in kept}


class CocoStuff(BaseDataset):
    """COCO-Stuff-15 (``variant="stuff15"``) or COCO-Things-12 (``variant="things12"``) semantic segmentation.

    Split ``train`` or ``val`` (2017). See the module docstring for the files read. ``things12`` reads the class
    maps written by :func:`prepare_coco_things12` when they exist (unless ``prefer_prepared=False``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "val", variant: str = "stuff15",
                 transform: Callable | None = None, min_size: int = 1, prefer_prepared: bool = True):
        super().__init__(transform, min_size)
        if variant not in ("stuff15", "things12"):
            raise ValueError(f"CocoStuff variant must be 'stuff15' or 'things12', got {variant!r}")
        if split not in ("train", "val"):
            raise ValueError(f"CocoStuff split must be 'train' or 'val', got {split!r}")
        self.root, self.split, self.variant = Path(root), split, variant
        self.key = "coco-stuff15" if variant == "stuff15" else "coco-things12"
        ann = self.root / "annotations"
        img_dir = _find_dir(self.root, f"images/{split}2017", f"{split}2017")
        if img_dir is None:
            raise FileNotFoundError(f"no COCO images under {self.root}: expected images/{split}2017/ or {split}2017/")
        self._panoptic: dict[str, dict[int, int]] | None = None
        stuffthing = _find_dir(self.root, f"stuffthingmaps_trainval2017/{split}2017", f"stuffthingmaps/{split}2017")
        if variant == "stuff15":
            cats = self._categories([ann / f"stuff_{split}2017.json", ann / "stuff_train2017.json",
                                     ann / "stuff_val2017.json"])
            names, cat_map = _coco_supercategories(cats, lambda c: 92 <= int(c["id"]) <= 182)
            pix = ann / f"stuff_{split}2017_pixelmaps"
            mask_dir, offset = (pix, 0) if pix.is_dir() or stuffthing is None else (stuffthing, 1)
            if not mask_dir.is_dir():
                raise FileNotFoundError(f"COCO-Stuff-15 needs {pix}/ (from stuff_annotations_trainval2017.zip)")
        else:
            pan_json = ann / f"panoptic_{split}2017.json"
            pan_dir = ann / f"panoptic_{split}2017"
            prepared = ann / f"things12_{split}2017"
            if prefer_prepared and (prepared / "class_names.txt").is_file():  # written once by prepare_coco_things12
                names = _read_list(prepared / "class_names.txt")
                cat_map = {k: k for k in range(len(names))}
                mask_dir, offset = prepared, 0
            elif pan_dir.is_dir() and pan_json.is_file():
                data = json.loads(pan_json.read_text())
                names, cat_map = _coco_supercategories(data["categories"], _is_thing)
                self._panoptic = {}
                for a in data["annotations"]:
                    seg = {int(s["id"]): cat_map.get(int(s["category_id"]), 255) for s in a["segments_info"]}
                    self._panoptic[Path(a["file_name"]).stem] = seg
                mask_dir, offset = pan_dir, 0
            elif stuffthing is not None:
                cats = self._categories([ann / f"instances_{split}2017.json", pan_json,
                                         ann / "instances_train2017.json", ann / "instances_val2017.json"])
                names, cat_map = _coco_supercategories(cats, _is_thing)
                mask_dir, offset = stuffthing, 1
            else:
                raise FileNotFoundError(f"COCO-Things-12 needs {pan_dir}/ with {pan_json} (panoptic annotations) "
                                        f"or stuffthingmaps_trainval2017/{split}2017/")
        self.class_names, self.num_classes = tuple(names), len(names)
        self.mask_dir = mask_dir
        # raw stored value -> class; pixel maps store the category id (offset 0) or id - 1 (offset 1)
        lut = np.full(256, 255, np.int64) if offset == 1 else np.full(256, -1, np.int64)
        if offset == 0 and variant == "stuff15":
            lut[0], lut[183] = 255, 255
        for cid, k in cat_map.items():
            if 0 <= cid - offset < 255:
                lut[cid - offset] = k
        lut[255] = 255  # unlabelled / ignore in every COCO map
        self._coco_lut = lut
        masks = sorted(mask_dir.glob("*.png"))
        if self._panoptic is not None:
            masks = [m for m in masks if m.stem in self._panoptic]
        _require_nonempty(masks, split, mask_dir)
        for m in masks:
            img = img_dir / f"{m.stem}.jpg"
            self.records.append(Record(id=m.stem, image=img, mask=m))
        self._check_files()

    @staticmethod
    def _categories(candidates: list[Path]) -> list[dict]:
        for c in candidates:
            if c.is_file():
                return json.loads(c.read_text())["categories"]
        raise FileNotFoundError(f"no COCO category JSON found (looked for {[str(c) for c in candidates]}); the class "
                                f"order comes from its supercategories")

    def _lut(self) -> np.ndarray:
        return self._coco_lut

    def _expected(self) -> str:
        return f"COCO {self.variant} category ids of {self.mask_dir.name}"

    def load_mask(self, rec: Record) -> np.ndarray:
        if self._panoptic is None:
            return super().load_mask(rec)
        try:
            with Image.open(rec.mask) as im:
                rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        except (OSError, SyntaxError) as err:
            raise BadImageError(rec.mask, f"unreadable panoptic PNG ({err})") from err
        seg_id = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        seg = self._panoptic[rec.id]
        ids = np.unique(seg_id)
        unknown = [int(v) for v in ids if v != 0 and v not in seg]
        if unknown:
            raise MaskLabelError(rec.mask, unknown, "segment ids listed in the panoptic JSON's segments_info")
        out = np.full(seg_id.shape, 255, np.int64)
        for v in ids:
            if v != 0:
                out[seg_id == v] = seg[int(v)]
        return out


def prepare_coco_things12(root: str | os.PathLike, split: str = "train", overwrite: bool = False) -> Path:
    """Convert COCO panoptic PNGs to COCO-Things-12 class maps once (``annotations/things12_<split>2017/``).

    Each output PNG holds the supercategory index 0..11 of thing pixels and 255 elsewhere; ``class_names.txt``
    records the class order. :class:`CocoStuff` (``things12``) reads this folder when it exists. Atomic.
    """
    from .layouts import atomic_dir

    out = Path(root) / "annotations" / f"things12_{split}2017"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to rebuild it")
    src = CocoStuff(root, split, "things12", prefer_prepared=False)
    if src._panoptic is None:
        raise FileNotFoundError(f"prepare_coco_things12 needs the panoptic annotations "
                                f"(annotations/panoptic_{split}2017.json and annotations/panoptic_{split}2017/)")
    with atomic_dir(out, overwrite) as tmp:
        for rec in src.records:
            Image.fromarray(src.load_mask(rec).astype(np.uint8), "L").save(tmp / f"{rec.id}.png")
        (tmp / "class_names.txt").write_text("".join(f"{n}\n" for n in src.class_names))
    return out


# -------------------------------------------------------------------------------------------- ADE20K


class ADE20K(BaseDataset):
    """ADE20K SceneParsing (ADEChallengeData2016), split ``train``/``training`` or ``val``/``validation``."""

    key = "ade20k"

    def __init__(self, root: str | os.PathLike, split: str = "val", reduce_zero_label: bool = False,
                 transform: Callable | None = None, min_size: int = 1):
        super().__init__(transform, min_size)
        root = Path(root)
        self.root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        sub = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
        if split not in sub:
            raise ValueError(f"ADE20K split must be one of {sorted(sub)}, got {split!r}")
        self.split, self.reduce_zero_label = split, reduce_zero_label
        ann_dir = self.root / "annotations" / sub[split]
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"no ADE20K annotations at {ann_dir}; expected ADEChallengeData2016/"
                                    f"annotations/{sub[split]}/")
        names = self._names()
        self.num_classes = 150 if reduce_zero_label else 151
        self.class_names = tuple(names) if reduce_zero_label else ("other", *names)
        self.ignore_index = 255 if reduce_zero_label else 0
        if reduce_zero_label:
            self.key = "ade20k/full"
        masks = sorted(ann_dir.glob("*.png"))
        _require_nonempty(masks, split, ann_dir)
        for m in masks:
            self.records.append(Record(id=m.stem, image=self.root / "images" / sub[split] / f"{m.stem}.jpg", mask=m))
        self._check_files()

    def _names(self) -> list[str]:
        for f in (self.root / "objectInfo150.txt", self.root / "objectInfo150.csv"):
            if f.is_file():
                rows = [ln for ln in f.read_text().splitlines()[1:] if ln.strip()]
                sep = "\t" if "\t" in rows[0] else ","
                names = [r.split(sep)[-1].strip().strip('"').split(";")[0] for r in rows]
                if len(names) == 150:
                    return names
        return [f"class_{i}" for i in range(1, 151)]

    def _lut(self) -> np.ndarray:
        lut = np.full(256, -1, np.int64)
        if self.reduce_zero_label:
            lut[0] = 255
            lut[1:151] = np.arange(150)
            lut[255] = 255
        else:
            lut[:151] = np.arange(151)
        return lut


# ---------------------------------------------------------------------------------------- Cityscapes


class Cityscapes(BaseDataset):
    """Cityscapes gtFine (``train``, ``val``, ``test``): labelIds -> 19 trainIds, everything else 255."""

    key = "cityscapes"
    class_names = CITYSCAPES_CLASSES
    num_classes = 19

    def __init__(self, root: str | os.PathLike, split: str = "val", transform: Callable | None = None,
                 min_size: int = 1):
        super().__init__(transform, min_size)
        self.root, self.split = Path(root), split
        img_dir, gt_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        if not img_dir.is_dir() or not gt_dir.is_dir():
            raise FileNotFoundError(f"no Cityscapes split {split!r} under {self.root}: expected leftImg8bit/{split}/ "
                                    f"and gtFine/{split}/")
        imgs = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        _require_nonempty(imgs, split, img_dir)
        for p in imgs:
            stem = p.name[: -len("_leftImg8bit.png")]
            self.records.append(Record(id=f"{p.parent.name}/{stem}", image=p,
                                       mask=gt_dir / p.parent.name / f"{stem}_gtFine_labelIds.png"))
        self._check_files()

    def _lut(self) -> np.ndarray:
        lut = np.full(256, -1, np.int64)
        lut[:34] = 255  # every labelId 0..33 is valid; those outside the 19 training classes are ignored
        lut[list(CITYSCAPES_TRAIN_LABEL_IDS)] = np.arange(19)
        lut[255] = 255
        return lut

    def _expected(self) -> str:
        return "Cityscapes labelIds 0..33 (and 255)"


# ----------------------------------------------------------------------------------------------- CUB


def cub_split_ids(ids: Sequence[int], is_train: Sequence[bool], split: str, mode: str = "official") -> list[int]:
    """The CUB image ids (in ``images.txt`` order) of ``split`` under split ``mode``.

    - ``official``: ``train`` = is_train == 1, ``test``/``val`` = the rest.
    - ``dinov2`` (alias ``dinov2_consistent``): ``train`` = official train + the first ``n_extra`` official-test
      images in ascending id order, ``val``/``test`` = the other official-test images, with
      ``n_extra = round(2257 / 5794 * n_test)`` (exactly 2,257 of 5,794 on CUB-200-2011: 8,251 / 3,537).
    - ``random70``: ``random.Random(42).shuffle`` of the ids in file order; the first ``floor(0.7 N)`` are train.
    """
    ids = [int(i) for i in ids]
    train_flags = dict(zip(ids, (bool(t) for t in is_train)))
    if split not in ("train", "val", "test"):
        raise ValueError(f"CUB split must be 'train', 'val' or 'test', got {split!r}")
    if mode == "official":
        return [i for i in ids if train_flags[i] == (split == "train")]
    if mode in ("dinov2", "dinov2_consistent"):
        test = sorted(i for i in ids if not train_flags[i])
        n_extra = round(2257 * len(test) / 5794)
        extra = set(test[:n_extra])
        if split == "train":
            return [i for i in ids if train_flags[i] or i in extra]
        return [i for i in ids if not train_flags[i] and i not in extra]
    if mode == "random70":
        order = list(ids)
        random.Random(42).shuffle(order)
        n_train = int(0.7 * len(order))
        chosen = set(order[:n_train]) if split == "train" else set(order[n_train:])
        return [i for i in order if i in chosen]
    raise ValueError(f"CUB split_mode must be 'official', 'dinov2' or 'random70', got {mode!r}")


class CUB200(BaseDataset):
    """CUB-200-2011 (or the synthetic CUB-style layout): image labels (class - 1) and one gt box per image.

    ``id`` is the image's path in ``images.txt`` (relative to ``images/``); ``cub_ids`` holds the numeric ids.
    Boxes are parsed with ``int(float(v))`` as the reference does.
    """

    key = "cub"

    def __init__(self, root: str | os.PathLike, split: str = "train", split_mode: str = "official",
                 transform: Callable | None = None, min_size: int = 1):
        super().__init__(transform, min_size)
        root = Path(root)
        self.root = root / "CUB_200_2011" if (root / "CUB_200_2011" / "images.txt").is_file() else root
        self.split, self.split_mode = split, split_mode
        files = {k: self.root / f"{k}.txt" for k in ("images", "image_class_labels", "train_test_split",
                                                       "bounding_boxes", "classes")}
        missing = [str(f) for k, f in files.items() if k != "bounding_boxes" and not f.is_file()]
        if missing:
            raise FileNotFoundError(f"not a CUB-200-2011 layout: missing {missing}")
        paths = {int(a): b for a, b in (ln.split(maxsplit=1) for ln in files["images"].read_text().splitlines()
                                        if ln.strip())}
        labels = {int(a): int(b) - 1 for a, b in (ln.split() for ln in files["image_class_labels"].read_text()
                                                  .splitlines() if ln.strip())}
        is_train = {int(a): b == "1" for a, b in (ln.split() for ln in files["train_test_split"].read_text()
                                                  .splitlines() if ln.strip())}
        boxes: dict[int, np.ndarray] = {}
        if files["bounding_boxes"].is_file():
            for ln in files["bounding_boxes"].read_text().splitlines():
                if ln.strip():
                    i, *v = ln.split()
                    boxes[int(i)] = np.asarray([[int(float(x)) for x in v]], np.float32)
        names = [ln.split(maxsplit=1)[1].strip() for ln in files["classes"].read_text().splitlines() if ln.strip()]
        self.class_names, self.num_classes = tuple(names), len(names)
        ids = list(paths)
        lacking = [i for i in ids if i not in labels or i not in is_train]
        if lacking:
            raise ValueError(f"CUB ids {lacking[:5]} of {files['images']} are missing from image_class_labels.txt or "
                             f"train_test_split.txt")
        chosen = cub_split_ids(ids, [is_train[i] for i in ids], split, split_mode)
        _require_nonempty(chosen, split, files["train_test_split"])
        self.cub_ids = chosen
        for i in chosen:
            self.records.append(Record(id=paths[i].strip(), image=self.root / "images" / paths[i].strip(),
                                       label=labels[i], boxes=boxes.get(i),
                                       box_labels=None if i not in boxes else np.asarray([labels[i]], np.int64)))
        self._check_files()


# --------------------------------------------------------------------------------------- ImageFolder


class ImageFolder(BaseDataset):
    """Plain images under ``root`` (recursive); ``id`` = relative POSIX path. No masks, no labels.

    Bad files never crash iteration: with ``on_bad="collect"`` (default) a bad file gives an item with
    ``image=None`` and ``error=<reason>`` (``collate`` drops it and reports it under ``bad``) and is appended to
    ``self.bad_files`` (in this process); ``on_bad="raise"`` raises :class:`BadImageError`. :meth:`scan`
    checks every file up front.
    """

    key = "folder"

    def __init__(self, root: str | os.PathLike, split: str | None = None, transform: Callable | None = None,
                 min_size: int = 1, on_bad: str = "collect", extensions: Sequence[str] = IMAGE_EXTENSIONS):
        super().__init__(transform, min_size)
        if on_bad not in ("collect", "raise"):
            raise ValueError(f"on_bad must be 'collect' or 'raise', got {on_bad!r}")
        self.root, self.on_bad = Path(root), on_bad
        files = list_images(self.root, extensions)
        if not files:
            raise ValueError(f"no images found under {self.root} (extensions {list(extensions)})")
        self.records = [Record(id=p.relative_to(self.root).as_posix(), image=p) for p in files]
        self.bad_files: list[tuple[str, str]] = []

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        try:
            image = load_rgb(rec.image, self.min_size)
        except BadImageError as err:
            if self.on_bad == "raise":
                raise
            self.bad_files.append((rec.id, err.reason))
            return {"image": None, "mask": None, "id": rec.id, "error": err.reason}
        item: Item = {"image": image, "mask": None, "id": rec.id}
        return self.transform(item) if self.transform is not None else item

    def scan(self) -> list[tuple[str, str]]:
        """Decode every file once; returns (and stores in ``bad_files``) the ``(id, reason)`` of bad ones."""
        from .images import check_image

        self.bad_files = [(r.id, why) for r in self.records if (why := check_image(r.image, self.min_size))]
        return list(self.bad_files)


# ----------------------------------------------------------------------------------------- synthetic


class SyntheticDataset(BaseDataset):
    """The synthetic benchmark rendered in memory, with the common item format (no files involved).

    Scene ``i`` is ``render_scene(seed, start + i, size, fine_grained)``. Coarse: masks of 7 classes (background +
    shapes), ``label`` = shape class of the largest object; fine-grained: masks {background, main, distractor},
    ``label`` = mark class. ``boxes`` are the instance boxes, ``box_labels`` their semantic mask classes.
    """

    key = "synthetic"

    def __init__(self, n: int, size: tuple[int, int] = (96, 96), seed: int = 0, fine_grained: bool = False,
                 start: int = 0, transform: Callable | None = None):
        from . import layouts, synthetic

        super().__init__(transform)
        self.scenes = synthetic.SyntheticScenes(start + n, tuple(size), seed, fine_grained)
        self.start, self.fine_grained = start, fine_grained
        self.class_names = layouts.class_names(fine_grained)
        self.num_classes = len(self.class_names)
        self.image_class_names = layouts.image_class_names(fine_grained)
        prefix = "fine" if fine_grained else "syn"  # the id format of render_scene (checked in the tests)
        self.records = [Record(id=f"{prefix}_{seed}_{start + i:06d}", image=Path()) for i in range(n)]

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < len(self.records):
            raise IndexError(i)
        sc = self.scenes[self.start + i]
        box_labels = (sc.instance_labels + 1 if not self.fine_grained
                      else np.asarray([1] + [2] * (len(sc.boxes) - 1), np.int64))
        item: Item = {"image": Image.fromarray(sc.image, "RGB"), "mask": sc.mask.astype(np.int64), "id": sc.image_id,
                      "label": sc.label, "boxes": sc.boxes, "box_labels": box_labels}
        return self.transform(item) if self.transform is not None else item


# ------------------------------------------------------------------------------------------ dispatch

DATASETS: dict[str, Callable[..., BaseDataset]] = {
    "voc": VOCSegmentation,
    "coco-stuff15": lambda root, split, **kw: CocoStuff(root, split, variant="stuff15", **kw),
    "coco-things12": lambda root, split, **kw: CocoStuff(root, split, variant="things12", **kw),
    "ade20k": ADE20K,
    "ade20k-full": lambda root, split, **kw: ADE20K(root, split, reduce_zero_label=True, **kw),
    "cityscapes": Cityscapes,
    "cub": CUB200,
    "folder": ImageFolder,
}


def detect_layout(root: str | os.PathLike) -> str:
    """The dataset key (``voc``, ``coco-stuff15``, ``coco-things12``, ``ade20k``, ``cityscapes``, ``cub``,
    ``folder``) of the layout found at ``root``."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"dataset path {r} does not exist or is not a directory")
    if any((r / c / "JPEGImages").is_dir() for c in (".", "VOC2012", "VOCdevkit/VOC2012")):
        return "voc"
    if (r / "images.txt").is_file() and (r / "image_class_labels.txt").is_file() or (
            r / "CUB_200_2011" / "images.txt").is_file():
        return "cub"
    if (r / "leftImg8bit").is_dir() and (r / "gtFine").is_dir():
        return "cityscapes"
    if (r / "ADEChallengeData2016").is_dir() or (r / "annotations" / "training").is_dir() or (
            r / "annotations" / "validation").is_dir():
        return "ade20k"
    ann = r / "annotations"
    if ann.is_dir() and (any(ann.glob("stuff_*2017_pixelmaps")) or (r / "stuffthingmaps_trainval2017").is_dir()):
        return "coco-stuff15"
    if ann.is_dir() and any(ann.glob("panoptic_*2017")):
        return "coco-things12"
    return "folder"


def open_dataset(path_or_name: str | os.PathLike, split: str = "val", **kwargs) -> BaseDataset:
    """Open a dataset from a path (layout detected by :func:`detect_layout`) or ``"<key>:<path>"``.

    Keys: ``voc``, ``coco-stuff15``, ``coco-things12``, ``ade20k``, ``ade20k-full``, ``cityscapes``, ``cub``,
    ``folder``. ``kwargs`` go to the dataset class (e.g. ``split_mode="dinov2"`` for CUB, ``transform=``).
    The names ``synthetic`` / ``synthetic-fine`` give an in-memory :class:`SyntheticDataset` (kwargs ``n`` = 64
    per split, ``size`` = (96, 96), ``seed`` = 0; ``train`` = scenes 0..n-1, ``val``/``test`` = the next n).
    """
    s = str(path_or_name)
    if s in ("synthetic", "synthetic-fine"):
        n = int(kwargs.pop("n", 64))
        if split not in ("train", "val", "test"):
            raise ValueError(f"synthetic split must be 'train', 'val' or 'test', got {split!r}")
        start = 0 if split == "train" else n  # as write_voc_layout: train = scenes 0..n-1, val = the next n
        return SyntheticDataset(n, kwargs.pop("size", (96, 96)), kwargs.pop("seed", 0), s == "synthetic-fine",
                                start=start, **kwargs)
    key, sep, rest = s.partition(":")
    if sep and key in DATASETS:
        root = Path(rest)
    else:
        root, key = Path(s), detect_layout(s)
    if key == "folder":
        return ImageFolder(root, split, **kwargs)
    return DATASETS[key](root, split, **kwargs)
