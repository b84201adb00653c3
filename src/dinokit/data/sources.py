"""Where a command's images come from: the one "synthetic or a path" opener, and ``ImageInput`` for extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import BaseDataset, SyntheticDataset, detect_layout, open_dataset
from .images import BadImageError, list_images, load_rgb

SYNTHETIC = "synthetic"
# scene seed of each synthetic split: seed * 10 + offset (train, val and test never share a scene)
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def is_synthetic(data: object) -> bool:
    """True for the names of the embedded benchmark (``synthetic``, ``synthetic-fine``)."""
    return str(data) in (SYNTHETIC, f"{SYNTHETIC}-fine")


def open_source(data: str | Path, split: str, *, n: int = 64, size: int = 64, seed: int = 0,
                fine_grained: bool = False, split_seeds: bool = True) -> BaseDataset:
    """``"synthetic"`` (or ``"synthetic-fine"``): ``n`` in-memory scenes of ``size`` px; any other value is a dataset
    root or ``key:path`` opened with :func:`dinokit.data.datasets.open_dataset`.

    Synthetic scene seeds are ``seed * 10 + {train: 0, val: 1, test: 2}[split]`` (``split_seeds=False``: ``seed`` for
    every split, the scheme of the single-split trainers).
    """
    if is_synthetic(data):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"synthetic data has splits {list(SPLIT_OFFSETS)}, got {split!r}")
        scene_seed = seed * 10 + SPLIT_OFFSETS[split] if split_seeds else seed
        return SyntheticDataset(n, (size, size), scene_seed, fine_grained or str(data).endswith("-fine"))
    path = Path(str(data).partition(":")[2] if ":" in str(data) and not Path(data).exists() else data)
    if not path.exists():
        raise FileNotFoundError(f"data={str(data)!r} does not exist; pass 'synthetic', an image folder or a dataset "
                                "root (VOC, COCO, ADE20K, Cityscapes, CUB layouts), optionally as key:path")
    return open_dataset(data, split)


class ImageInput(Dataset):
    """Images of a dataset or a folder, resized to ``size`` (H, W) as uint8 (3, H, W) tensors.

    Bad files never raise here: the item carries ``ok=False`` and the reason, so the run can name them in
    ``bad_files.txt`` and go on. No model runs in ``__getitem__``.
    """

    def __init__(self, root: Path, size: tuple[int, int], split: str | None = None, min_side: int = 1):
        self.root, self.size, self.min_side = Path(root), size, min_side
        self.dataset = None
        if not self.root.exists():
            raise FileNotFoundError(f"--data {self.root} does not exist")
        if self.root.is_dir() and detect_layout(self.root) != "folder":
            self.dataset = open_dataset(self.root, split or "train")
            self.ids = list(self.dataset.ids)
        else:
            self.paths = [self.root] if self.root.is_file() else list_images(self.root)
            base = self.root.parent if self.root.is_file() else self.root
            self.ids = [str(p.relative_to(base)) for p in self.paths]
        if not self.ids:
            raise ValueError(f"--data {self.root} holds no images")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        try:
            img = self.dataset[i]["image"] if self.dataset is not None else load_rgb(self.paths[i])
            if min(img.size) < self.min_side:
                raise ValueError(f"image {img.size[0]}x{img.size[1]} is smaller than one {self.min_side}-px patch")
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
            return {"image": x, "id": self.ids[i], "index": i, "ok": True, "reason": ""}
        except (BadImageError, OSError, ValueError) as err:
            return {"image": torch.zeros(3, *self.size, dtype=torch.uint8), "id": self.ids[i], "index": i,
                    "ok": False, "reason": str(err)}




def _mask_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    """uint8 when every label (and the ignore index) fits in [0, 255], else int16."""
    return torch.uint8 if num_classes <= 256 and 0 <= ignore_index <= 255 else torch.int16


def _torch_nearest(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) integer map -> ``size`` with ``F.interpolate(mode="nearest")`` (src = floor(dst·in/out))."""
    if tuple(m.shape) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m[None, None].double(), size=tuple(size), mode="nearest")[0, 0].long()


class SegSplit(Dataset):
    """A labelled split squashed to ``size`` x ``size``, one item at a time (for DataLoader workers).

    Items: ``image`` uint8 (3, S, S) (antialiased bilinear), ``mask`` (S, S) nearest at pixel centres, then
    torch-nearest resized to ``mask_size`` x ``mask_size`` when given (``mask_size="full"``: the original
    (H, W) mask), stored as uint8 (int16 when labels exceed 255); ``id`` and ``index`` (position in the split).
    ``mask_rule="torch"`` resizes the original mask to S with torch's nearest rule (floor(dst·in/out)) instead
    of the pixel-centre rule (what upstream code that resizes label tensors does).
    ``indices`` restricts the split (a subset, or this rank's shard). Nothing is cached: memory does not grow with N.
    """

    def __init__(self, dataset: BaseDataset, size: int, mask_size: int | str | None = None,
                 indices: list[int] | None = None, need_masks: bool = True, data_name: str = "data",
                 split: str = "split", mask_rule: str = "pixel_centre"):
        from .transforms import SegTransform

        if mask_rule not in ("pixel_centre", "torch"):
            raise ValueError(f"mask_rule {mask_rule!r}: choose pixel_centre or torch")
        self.mask_rule = mask_rule
        self.dataset, self.size, self.mask_size, self.need_masks = dataset, int(size), mask_size, need_masks
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.tf = SegTransform(resize=(self.size, self.size))
        self.key = getattr(dataset, "key", "dataset")
        self.num_classes, self.ignore_index = int(dataset.num_classes), int(dataset.ignore_index)
        self.class_names = tuple(getattr(dataset, "class_names", ())) or tuple(str(c) for c in range(self.num_classes))
        self.mask_dtype = _mask_dtype(self.num_classes, self.ignore_index)
        self._where = (data_name, split)
        all_ids = list(getattr(dataset, "ids", []))
        self.ids = [str(all_ids[i]) for i in self.indices] if len(all_ids) == len(dataset) else []

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        item = self.dataset[i]
        out = {"id": str(item["id"]), "index": i}
        if self.need_masks and item.get("mask") is None:
            raise ValueError(f"{self._where[0]} split {self._where[1]!r} item {item['id']} has no mask; this "
                             "evaluation needs labels")
        t = self.tf(item)
        out["image"] = torch.from_numpy(np.asarray(t["image"], np.uint8).copy()).permute(2, 0, 1)
        if self.need_masks:
            if self.mask_size == "full":
                m = torch.from_numpy(np.asarray(item["mask"], np.int64))
            else:
                if self.mask_rule == "torch":
                    m = _torch_nearest(torch.from_numpy(np.asarray(item["mask"], np.int64)), (self.size, self.size))
                else:
                    m = torch.from_numpy(np.asarray(t["mask"], np.int64))
                if self.mask_size is not None:
                    m = _torch_nearest(m, (int(self.mask_size), int(self.mask_size)))
            out["mask"] = m.to(self.mask_dtype)
        return out


def collate_seg(items: list[dict]) -> dict:
    """Stack images (B, 3, S, S); masks stacked when they share a shape, else a list; ids; index (B,)."""
    out = {"image": torch.stack([it["image"] for it in items]), "id": [it["id"] for it in items],
           "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    if "mask" in items[0]:
        ms = [it["mask"] for it in items]
        out["mask"] = torch.stack(ms) if len({tuple(m.shape) for m in ms}) == 1 else ms
    return out


def open_split(data: str | Path, split: str, size: int, *, batch_size: int = 32, num_workers: int = 0,
               mask_size: int | str | None = None, indices: list[int] | None = None, need_masks: bool = True,
               n_images: int | None = None, mask_rule: str = "pixel_centre") -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`SegSplit` of ``data``/``split`` (ordered, not shuffled); ``loader.dataset``
    carries ``key``, ``num_classes``, ``ignore_index``, ``class_names`` and ``indices``. ``n_images`` keeps the
    first n items (applied before ``indices``, which index into the split)."""
    from torch.utils.data import DataLoader

    ds = open_dataset(Path(data), split)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {data} is empty; check --data and --split")
    n = len(ds) if n_images is None else min(len(ds), n_images)
    idx = [i for i in (indices if indices is not None else range(n)) if i < n]
    sp = SegSplit(ds, size, mask_size, idx, need_masks, str(data), split, mask_rule)
    return DataLoader(sp, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_seg,
                      persistent_workers=False)
