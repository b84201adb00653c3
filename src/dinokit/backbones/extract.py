"""Batched, sharded, streaming feature extraction: ``DenseFeatures`` of a dataset into safetensors shards.

Used by ``dinokit features``, the evaluation commands and the demo. The dataset yields dicts with a uint8
``image`` (3, H, W), ``id``, ``index``, ``ok`` and ``reason`` (see ``dinokit.data.sources.ImageInput``); no model runs
in ``__getitem__``. Shard k holds dataset positions [k*S, (k+1)*S), so the shards do not depend on the number of
processes; rank r of W writes the shards k = r mod W.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .shards import read_shard, shard_is_complete, shard_name, write_shard


def as_uint8_chw(image) -> torch.Tensor:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, torch.Tensor):
        t = image if image.shape[0] == 3 else image.permute(2, 0, 1)
        return t.to(torch.uint8)
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)


def normalise(backbone, x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float (B, 3, H, W) normalised with the backbone's mean and std there."""
    mean = torch.tensor(backbone.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


@torch.no_grad()
def patch_features(backbone, images, batch_size: int = 32, device: str | torch.device | None = None) -> torch.Tensor:
    """(N, h, w, D) fp32 CPU patch tokens of uint8 (H, W, 3) images (a list or an (N, H, W, 3) array), batched.

    For a split that fits in memory (the demo, small probes); datasets stream through :func:`extract_features`.
    """
    import numpy as np

    device = device or next(backbone.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        arr = np.ascontiguousarray(np.stack(images[i:i + batch_size]))
        x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2)
        out.append(backbone.forward_features(normalise(backbone, x)).patch.float().cpu())
    return torch.cat(out)


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


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(backbone, data: Dataset, out: Path, *, batch_size: int = 32, shard_size: int = 256,
                     store_dtype: torch.dtype = torch.float32, num_workers: int = 0, meta: dict | None = None,
                     rank: int | None = None, world_size: int | None = None, progress: bool = True) -> dict:
    """Extract ``DenseFeatures`` of every item into shards under ``out``; returns a summary dict.

    Shard k holds positions [k*shard_size, (k+1)*shard_size); rank r of W writes the shards k = r mod W, so the
    result does not depend on W. Finished shards are skipped (resume); each shard is written atomically. With a
    ``meta["fingerprint"]`` (the options that change the bytes), only shards of the same fingerprint count as finished.
    """
    from rich.progress import Progress

    r0, w0 = dist_info()
    rank, world_size = (r0 if rank is None else rank), (w0 if world_size is None else world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(backbone.parameters()).device
    n_shards = (len(data) + shard_size - 1) // shard_size
    mine = [k for k in range(n_shards) if k % world_size == rank]
    fingerprint = (meta or {}).get("fingerprint")  # a shard of other options is redone, never kept
    todo = [k for k in mine if not shard_is_complete(out / shard_name(k), fingerprint)]
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
            f = backbone.forward_features(normalise(backbone, batch["image"][ok].to(device, non_blocking=True)))
            shard.add(f, batch["index"][ok], [i for i, g in zip(batch["id"], ok.tolist()) if g], store_dtype)
        if shard is not None:
            done_images += shard.write(out, backbone, store_dtype, meta, grid)
            bar.advance(task)
    # bad files of every shard of this rank, including shards finished by an earlier (killed) run
    for k in mine:
        _, _, m = read_shard(out / shard_name(k))
        bad += [tuple(b) for b in m.get("bad_files", [])]
    return {"rank": rank, "world_size": world_size, "shards": len(mine), "written": len(todo),
            "images": done_images, "bad": bad, "n_shards": n_shards}




@torch.no_grad()
def iter_patch_features(backbone, loader, device: str | torch.device | None = None):
    """Yield ``(patch, batch)`` per batch of ``loader`` (items with a uint8 ``image`` (B, 3, H, W)): ``patch`` the
    (B, h, w, D) fp32 CPU patch tokens, ``batch`` the collated batch. One batch of features is alive at a time."""
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        yield backbone.forward_features(normalise(backbone, x)).patch.float().cpu(), batch


def features_to_memmap(batches, folder: Path, n: int, name: str = "split", masks: bool = True):
    """Write the ``(patch, batch)`` pairs of :func:`iter_patch_features` into disk-backed arrays under ``folder``.

    Row ``j`` of the arrays is the ``j``-th position of ``batch["index"]`` in ``positions`` (the sorted indices
    seen), so rows follow dataset order whatever the batching. Returns ``(feats, masks, positions)``: ``feats`` an
    (n, h, w, D) fp32 ``np.memmap``, ``masks`` an (n, H, W) memmap of the masks' dtype (None without masks or when
    mask shapes vary; then ``masks`` is a list), ``positions`` the sorted dataset indices. Only one batch is in RAM.
    """
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    feats = mm = None
    ragged: list | None = None
    rows: list[int] = []
    j = 0
    for f, batch in batches:
        if feats is None:
            feats = np.lib.format.open_memmap(folder / f"{name}_feats.npy", "w+", np.float32, (n, *f.shape[1:]))
        b = f.shape[0]
        feats[j:j + b] = f.numpy()
        if masks:
            m = batch["mask"]
            if isinstance(m, torch.Tensor) and ragged is None:
                if mm is None:
                    mm = np.lib.format.open_memmap(folder / f"{name}_masks.npy", "w+", m.numpy().dtype,
                                                   (n, *m.shape[1:]))
                mm[j:j + b] = m.numpy()
            else:
                if ragged is None:
                    ragged = [torch.from_numpy(np.asarray(mm[i])) for i in range(j)] if mm is not None else []
                ragged += list(m)
        rows += batch["index"].tolist()
        j += b
    if feats is None:
        raise ValueError(f"{name}: no images to featurise (empty split or shard)")
    if j != n:
        raise ValueError(f"{name}: expected {n} images, the loader gave {j}")
    order = np.argsort(np.asarray(rows), kind="stable")
    if not np.array_equal(order, np.arange(n)):  # loaders are ordered; keep dataset order in any case
        feats[:] = feats[order]
        if mm is not None:
            mm[:] = mm[order]
        if ragged is not None:
            ragged = [ragged[i] for i in order]
    return feats, (ragged if ragged is not None else mm), sorted(rows)


def all_gather_rows(local: list, local_rows: list[int], folder: Path, name: str, n: int, chunk: int = 64):
    """Under DDP: every rank ends with the full (n, ...) arrays of which it holds ``local_rows`` (dataset
    positions) in ``local`` (a list of arrays with those rows, same order). Rank r's rows are broadcast to all in
    chunks of ``chunk`` rows and written into disk-backed (``np.memmap``) arrays under ``folder``. Without a process
    group returns ``local`` unchanged. Lists (ragged masks) are gathered as lists."""
    import numpy as np
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    rank, world = dist.get_rank(), dist.get_world_size()
    counts: list = [None] * world
    dist.all_gather_object(counts, (len(local_rows), [(a.dtype.str, a.shape[1:]) if not isinstance(a, list)
                                                      else None for a in local]))
    spec = next(c[1] for c in counts if c[0])
    folder = Path(folder)
    outs = [np.lib.format.open_memmap(folder / f"{name}_all{k}.npy", "w+", np.dtype(sp[0]), (n, *sp[1]))
            if sp is not None else [None] * n for k, sp in enumerate(spec)]
    for r in range(world):
        cnt = counts[r][0]
        for s in range(0, cnt, chunk):
            obj = [None]
            if r == rank:
                obj = [(local_rows[s:s + chunk], [np.asarray(a[s:s + chunk]) if not isinstance(a, list)
                                                  else a[s:s + chunk] for a in local])]
            dist.broadcast_object_list(obj, src=r)
            rows, parts = obj[0]
            for o, p in zip(outs, parts, strict=True):
                for q, row in enumerate(rows):
                    o[row] = p[q]
    return outs
