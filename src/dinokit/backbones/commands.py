"""``dinokit features`` (sharded dense features) and ``dinokit attention`` (attention and PCA figures)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .shards import shard_is_complete, shard_name, write_shard

log = logging.getLogger(__name__)


class ImageInput(Dataset):
    """Images of a dataset or a folder, resized to ``size`` (H, W) as uint8 (3, H, W) tensors.

    Bad files never raise here: the item carries ``ok=False`` and the reason, so the run can name them in
    ``bad_files.txt`` and go on. No model runs in ``__getitem__``.
    """

    def __init__(self, root: Path, size: tuple[int, int], split: str | None = None, min_side: int = 1):
        from ..data.images import list_images

        self.root, self.size, self.min_side = Path(root), size, min_side
        self.dataset = None
        if not self.root.exists():
            raise FileNotFoundError(f"--data {self.root} does not exist")
        from ..data.datasets import detect_layout, open_dataset

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
        from PIL import Image

        from ..data.images import BadImageError, load_rgb

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


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "id": [it["id"] for it in items],
            "index": torch.tensor([it["index"] for it in items]), "ok": torch.tensor([it["ok"] for it in items]),
            "reason": [it["reason"] for it in items]}


def backbone_record(bb) -> dict:
    """What identifies the features of a backbone (stored in every shard)."""
    return {"name": bb.name, "arch": bb.arch, "patch_size": bb.patch_size, "embed_dim": bb.embed_dim,
            "num_registers": bb.num_registers, "weights": bb.weights_info}


class _ShardBuffer:
    """Tokens of one shard as batches arrive; ``write`` saves it atomically and returns its image count."""

    def __init__(self, k: int):
        self.k, self.grid = k, None
        self.parts: dict[str, list[torch.Tensor]] = {"patch": [], "cls": [], "registers": [], "index": []}
        self.ids: list[str] = []
        self.bad: list[tuple[str, str]] = []

    def add(self, f, index: torch.Tensor, ids: list[str], dtype: torch.dtype) -> None:
        self.grid = f.grid
        self.parts["patch"].append(f.patch.to("cpu", dtype))
        if f.cls is not None:
            self.parts["cls"].append(f.cls.to("cpu", dtype))
        self.parts["registers"].append(f.registers.to("cpu", dtype))
        self.parts["index"].append(index)
        self.ids += ids

    def write(self, out: Path, backbone, dtype: torch.dtype, meta: dict, grid: tuple[int, int]) -> int:
        """``grid``: the expected grid, used when every image of the shard was bad (an empty shard)."""
        tensors = {n: torch.cat(v) for n, v in self.parts.items() if v}
        if self.grid is None:  # every image of this shard was bad: an empty shard keeps the bookkeeping
            D, R = backbone.embed_dim, backbone.num_registers
            tensors = {"patch": torch.zeros(0, *grid, D, dtype=dtype), "registers": torch.zeros(0, R, D, dtype=dtype),
                       "index": torch.zeros(0, dtype=torch.long)}
        tensors["grid"] = torch.tensor(self.grid or grid)
        write_shard(out / shard_name(self.k), tensors, self.ids, {**meta, "bad_files": self.bad})
        return len(self.ids)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(backbone, data: Dataset, out: Path, *, batch_size: int = 32, shard_size: int = 256,
                     store_dtype: torch.dtype = torch.float32, num_workers: int = 0, meta: dict | None = None,
                     rank: int | None = None, world_size: int | None = None, progress: bool = True) -> dict:
    """Extract ``DenseFeatures`` of every item into shards under ``out``; returns a summary dict.

    Shard k holds positions [k*shard_size, (k+1)*shard_size); rank r of W writes the shards k = r mod W, so the
    result does not depend on W. Finished shards are skipped (resume); each shard is written atomically.
    """
    from rich.progress import Progress

    r0, w0 = _dist()
    rank, world_size = (r0 if rank is None else rank), (w0 if world_size is None else world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(backbone.parameters()).device
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    n_shards = (len(data) + shard_size - 1) // shard_size
    mine = [k for k in range(n_shards) if k % world_size == rank]
    todo = [k for k in mine if not shard_is_complete(out / shard_name(k))]
    meta = {**(meta or {}), "backbone": backbone_record(backbone)}
    bad: list[tuple[str, str]] = []
    done_images = 0
    # one loader for the whole run (workers start once); batches never straddle a shard boundary
    batches = [list(range(j, min(j + batch_size, (k + 1) * shard_size, len(data))))
               for k in todo for j in range(k * shard_size, min((k + 1) * shard_size, len(data)), batch_size)]
    loader = DataLoader(data, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    shard: _ShardBuffer | None = None
    grid = backbone.grid_size(*data.size) if hasattr(data, "size") else (0, 0)
    with Progress(disable=not progress or rank != 0) as bar:
        task = bar.add_task("features", total=len(todo))
        for batch in loader:
            k = int(batch["index"][0]) // shard_size
            if shard is None or shard.k != k:
                if shard is not None:
                    done_images += shard.write(out, backbone, store_dtype, meta, grid)
                    bar.advance(task)
                shard = _ShardBuffer(k)
            ok = batch["ok"]
            shard.bad += [(i, r) for i, r, g in zip(batch["id"], batch["reason"], ok.tolist()) if not g]
            if not ok.any():
                continue
            x = batch["image"][ok].to(device, non_blocking=True).float().div_(255.0)
            f = backbone.forward_features((x - mean) / std)
            shard.add(f, batch["index"][ok], [i for i, g in zip(batch["id"], ok.tolist()) if g], store_dtype)
        if shard is not None:
            done_images += shard.write(out, backbone, store_dtype, meta, grid)
            bar.advance(task)
    # bad files of every shard of this rank, including shards finished by an earlier (killed) run
    from .shards import read_shard

    for k in mine:
        _, _, m = read_shard(out / shard_name(k))
        bad += [tuple(b) for b in m.get("bad_files", [])]
    return {"rank": rank, "world_size": world_size, "shards": len(mine), "written": len(todo),
            "images": done_images, "bad": bad, "n_shards": n_shards}


def _finish(out: Path, summary: dict, world_size: int, meta: dict) -> list[tuple[str, str]]:
    """Rank 0: merge bad-file lists of all shards into bad_files.txt and write manifest.json."""
    from ..io import atomic_write_text
    from .shards import read_shard

    bad: list[tuple[str, str]] = []
    shards = [shard_name(k) for k in range(summary["n_shards"])]
    for s in shards:
        _, _, m = read_shard(out / s)
        bad += [tuple(b) for b in m.get("bad_files", [])]
    atomic_write_text(out / "bad_files.txt", "".join(f"{i}\t{r}\n" for i, r in bad))
    atomic_write_text(out / "manifest.json", json.dumps({"shards": shards, "bad_files": len(bad),
                                                         "world_size": world_size, **meta}, indent=1, default=str))
    return bad


def _parse_size(size: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return int(size[0]), int(size[0])
    if len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"--size takes one value (square) or two (H W), got {size}")


def features(data: Path, out: Path, backbone: str = "dinov2_vits14", weights: str = "pretrained",
             size: int | tuple[int, int] = 224, size_policy: str = "error", split: str | None = None,
             batch_size: int = 32,
             shard_size: int = 256, dtype: str = "float32", device: str = "cpu", num_workers: int = 2,
             rasa: Path | None = None, skip_bad: bool = False, seed: int = 0) -> int:
    """Extract dense features (patch, CLS, register tokens) of a dataset or image folder into safetensors shards.

    Resumes after a kill (finished shards are kept), names bad files in bad_files.txt and runs under DDP
    (torchrun: each rank writes its own shards; the result does not depend on the number of processes).

    Args:
        data: image folder, single image, or dataset root (VOC-style, CUB-style, ...).
        out: output directory for shard-*.safetensors, manifest.json and bad_files.txt.
        backbone: short name or timm architecture (see dinokit.backbones.supported_names()).
        weights: "pretrained", a tag, a checkpoint file, or "random".
        size: input size: one value (square) or [H, W]; images are resized to it.
        size_policy: what to do with sizes that are not multiples of the patch size: error, crop, pad, resize.
        split: dataset split when data is a dataset layout.
        batch_size: images per forward pass.
        shard_size: images per shard file.
        dtype: stored dtype: float32, float16 or bfloat16.
        device: torch device.
        num_workers: DataLoader workers for decoding.
        rasa: optional RASA head applied to the patch tokens.
        skip_bad: exit 0 even when some files could not be read (they are still listed).
        seed: random seed (recorded; extraction itself is deterministic).
    """
    from ..io import run_metadata
    from . import load_backbone

    torch.manual_seed(seed)
    store = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if store is None:
        raise ValueError(f"--dtype {dtype!r}: choose float32, float16 or bfloat16")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    hw = _parse_size(size)
    bb = load_backbone(backbone, weights, size_policy=size_policy, device=device,
                       rasa=str(rasa) if rasa else None).eval()
    ds = ImageInput(Path(data), hw, split, min_side=bb.patch_size)
    config = {"data": str(data), "backbone": backbone, "weights": weights, "size": list(hw),
              "size_policy": size_policy, "split": split, "dtype": dtype, "shard_size": shard_size, "seed": seed,
              "rasa": str(rasa) if rasa else None}
    meta = run_metadata(config, protocol="features", weights=bb.weights_info)
    meta["backbone"] = backbone_record(bb)
    meta.pop("host", None)
    summary = extract_features(bb, ds, Path(out), batch_size=batch_size, shard_size=shard_size, store_dtype=store,
                               num_workers=num_workers, meta=meta)
    rank, world = summary["rank"], summary["world_size"]
    if world > 1:
        torch.distributed.barrier()
    bad = _finish(Path(out), summary, world, meta) if rank == 0 else summary["bad"]
    if rank == 0:
        print(f"features: {len(ds) - len(bad)} images in {summary['n_shards']} shards under {out} "
              f"({summary['written']} written now, {summary['shards'] - summary['written']} kept from before)")
        for i, r in bad:
            print(f"bad file: {i}: {r}")
        if bad:
            print(f"{len(bad)} bad file(s) listed in {Path(out) / 'bad_files.txt'}"
                  + ("" if skip_bad else "; exit code 1 (pass --skip-bad to accept)"))
    return 0 if (not bad or skip_bad) else 1


def attention(images: Path, out: Path, backbone: str = "dino_vits16", weights: str = "pretrained",
              size: int | tuple[int, int] = 224, size_policy: str = "resize", block: int = -1, tau: float = 0.6,
              max_images: int = 16, device: str = "cpu", seed: int = 0) -> int:
    """Draw per-head attention overlays, the head-mean map, the tau-mass mask and a PCA map per image (PNG).

    Args:
        images: an image file or a folder of images.
        out: output folder for the PNGs and attention.json.
        backbone: short name or timm architecture.
        weights: "pretrained", a tag, a checkpoint file, or "random".
        size: input size: one value (square) or [H, W].
        size_policy: error, crop, pad or resize for sizes that are not multiples of the patch size.
        block: the block whose CLS attention is drawn (negative counts from the end).
        tau: attention mass kept by the mask (DINO's visualisation uses 0.6).
        max_images: at most this many images.
        device: torch device.
        seed: random seed.
    """
    from ..io import atomic_write_text, run_metadata
    from ..viz import mass_threshold_mask, pca_rgb, save_grid, upsample_map
    from . import load_backbone

    torch.manual_seed(seed)
    bb = load_backbone(backbone, weights, size_policy=size_policy, device=device).eval()
    ds = ImageInput(Path(images), _parse_size(size), min_side=bb.patch_size)
    out = Path(out)
    written, bad = [], []
    for i in range(min(len(ds), max_images)):
        item = ds[i]
        if not item["ok"]:
            bad.append((item["id"], item["reason"]))
            continue
        img = item["image"].permute(1, 2, 0).numpy()
        x = (item["image"][None].float().to(device) / 255 - torch.tensor(bb.mean, device=device).view(1, 3, 1, 1)) \
            / torch.tensor(bb.std, device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            f, a = bb(x, attention_block=block)
        hw = img.shape[:2]
        ren = a.renormalized()[0].cpu()
        mask = mass_threshold_mask(ren.mean(0), tau)
        heads = [upsample_map(ren[h], hw) for h in range(ren.shape[0])]
        panels = [[img, *[img] * len(heads), img, img, upsample_map(pca_rgb(f.patch.cpu())[0], hw)]]
        overlays = [[None, *heads, upsample_map(ren.mean(0), hw), upsample_map(mask.float(), hw), None]]
        titles = [["image", *[f"head {h}" for h in range(len(heads))], "head mean", f"mask tau={tau}", "PCA"]]
        name = Path(item["id"]).with_suffix("").as_posix().replace("/", "__")
        written.append(str(save_grid(out / f"{name}_attention.png", panels, titles, overlays=overlays)))
    meta = run_metadata({"images": str(images), "backbone": backbone, "weights": weights, "size": size,
                         "block": block, "tau": tau, "seed": seed}, "attention", bb.weights_info)
    atomic_write_text(out / "attention.json", json.dumps({"figures": written, "bad_files": bad, "meta": meta},
                                                         indent=1, default=str))
    print(f"attention: {len(written)} figure(s) in {out}" + (f"; {len(bad)} bad file(s)" if bad else ""))
    return 1 if bad else 0
