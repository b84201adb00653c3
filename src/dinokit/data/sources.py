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


