"""``dinokit features`` (sharded dense features) and ``dinokit attention`` (attention and PCA figures)."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

from ..errors import strict_json
from . import command

log = logging.getLogger(__name__)


def _finish(out: Path, summary: dict, world_size: int, meta: dict) -> list[tuple[str, str]]:
    """Rank 0: merge bad-file lists of all shards into bad_files.txt and write manifest.json."""
    from ..backbones.shards import read_shard, shard_name
    from ..io import atomic_write_text

    bad: list[tuple[str, str]] = []
    shards = [shard_name(k) for k in range(summary["n_shards"])]
    for s in shards:
        _, _, m = read_shard(out / s)
        bad += [tuple(b) for b in m.get("bad_files", [])]
    atomic_write_text(out / "bad_files.txt", "".join(f"{i}\t{r}\n" for i, r in bad))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(out / "manifest.json", strict_json({"shards": shards, "bad_files": len(bad),
                                                          "world_size": world_size, **meta, "created": created}))
    return bad


def _fingerprint(data: Path, backbone: str, weights: str, hw: tuple[int, int], size_policy: str, split: str | None,
                 dtype: str, shard_size: int, rasa: Path | None) -> dict:
    """Everything that changes the bytes of a shard; computed before the model loads (files by sha256)."""
    import importlib.metadata as md

    from ..backbones.weights import sha256

    w = Path(weights)
    try:
        version = md.version("dinokit")
    except md.PackageNotFoundError:
        version = "unknown"
    return {"data": str(Path(data).resolve()), "backbone": backbone,
            "weights": f"sha256:{sha256(w)}" if w.is_file() else weights, "size": list(hw),
            "size_policy": size_policy, "split": split, "dtype": dtype, "shard_size": shard_size,
            "rasa": f"sha256:{sha256(rasa)}" if rasa and Path(rasa).is_file() else (str(rasa) if rasa else None),
            "dinokit": version}


_OPTION = {"data": "--data", "backbone": "--backbone", "weights": "--weights", "size": "--size",
           "size_policy": "--size_policy", "split": "--split", "dtype": "--dtype", "shard_size": "--shard_size",
           "rasa": "--rasa", "dinokit": "dinokit version"}


def _check_stale(out: Path, fp: dict, overwrite: bool) -> None:
    """Refuse (StaleOutputError) when ``out`` holds shards or a manifest of another fingerprint; ``overwrite``
    deletes them instead. Files other than the shards, manifest.json and bad_files.txt are never touched."""
    from ..backbones.shards import SHARD_FORMAT, shard_fingerprint
    from ..errors import StaleOutputError, differing

    shards = sorted(out.glob("shard-*.safetensors"))
    olds: list[tuple[str, dict]] = []
    man = out / "manifest.json"
    if man.is_file():
        try:
            olds.append(("manifest.json", json.loads(man.read_text()).get("fingerprint") or {}))
        except (OSError, ValueError):
            olds.append(("manifest.json", {}))
    for f in shards:
        olds.append((f.name, shard_fingerprint(f) or {}))
    stale = [(name, old) for name, old in olds if differing(old, fp)]
    if not stale:
        return
    if overwrite:
        for f in [*shards, man, out / "bad_files.txt"]:
            f.unlink(missing_ok=True)
        log.info("--overwrite: removed %d shard(s) of other options from %s", len(shards), out)
        return
    name, old = stale[0]
    diff = differing(old, fp)
    if not old:
        what = f"{name} has no fingerprint (written by an older dinokit, or not a {SHARD_FORMAT} shard)"
    else:
        what = "; ".join(f"{_OPTION.get(k, k)} was {old.get(k)!r}, now {fp.get(k)!r}" for k in diff)
    raise StaleOutputError(f"--out {out} holds features made with other options ({what}); "
                           f"{len(stale)} file(s) differ; nothing was changed",
                           hint="pass --overwrite to recompute every shard, or another --out")


def _parse_size(size: int | tuple[int, ...]) -> tuple[int, int]:
    from ..errors import UsageError, check_positive

    if isinstance(size, int):
        check_positive(size, "--size")
        return size, size
    if len(size) == 1:
        hw = int(size[0]), int(size[0])
    elif len(size) == 2:
        hw = int(size[0]), int(size[1])
    else:
        raise UsageError(f"--size takes one value (square) or two (H W), got {size}", hint="e.g. --size 224")
    check_positive(list(hw), "--size")
    return hw


@command("features")
def features(data: Path, out: Path, backbone: str = "dinov2_vits14", weights: str = "pretrained",
             size: int | tuple[int, int] = 224, size_policy: str = "error", split: str | None = None,
             batch_size: int = 32,
             shard_size: int = 256, dtype: str = "float32", device: str = "cpu", num_workers: int = 2,
             rasa: Path | None = None, skip_bad: bool = False, overwrite: bool = False, seed: int = 0) -> int:
    """Extract dense features (patch, CLS, register tokens) of a dataset or image folder into safetensors shards.

    Resumes after a kill (finished shards of the same options are kept; shards of other options make it refuse
    unless --overwrite), names bad files in bad_files.txt and runs under DDP
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
        overwrite: delete shards made with other options (backbone, weights, size, dtype, split, ...) and redo all.
        seed: random seed (recorded; extraction itself is deterministic).
    """
    import torch

    from ..backbones import load_backbone
    from ..backbones.extract import backbone_record, extract_features
    from ..data.sources import ImageInput
    from ..errors import UsageError, check_out_dir, check_positive
    from ..io import run_metadata

    torch.manual_seed(seed)
    store = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if store is None:
        raise UsageError(f"--dtype {dtype!r}: choose float32, float16 or bfloat16", hint="e.g. --dtype float16")
    check_positive(batch_size, "--batch_size")
    check_positive(shard_size, "--shard_size")
    if not Path(data).exists():
        from ..errors import MissingFileError

        raise MissingFileError(f"--data {data} does not exist", hint="pass an image folder, an image or a dataset root")
    if rasa is not None and not Path(rasa).is_file():
        from ..errors import MissingFileError

        raise MissingFileError(f"--rasa {rasa} does not exist", hint="pass the head file written by `dinokit rasa fit`")
    hw = _parse_size(size)
    out = check_out_dir(out)
    fp = _fingerprint(Path(data), backbone, weights, hw, size_policy, split, dtype, shard_size, rasa)
    _check_stale(out, fp, overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    bb = load_backbone(backbone, weights, size_policy=size_policy, device=device,
                       rasa=str(rasa) if rasa else None).eval()
    ds = ImageInput(Path(data), hw, split, min_side=bb.patch_size)
    config = {"data": str(data), "backbone": backbone, "weights": weights, "size": list(hw),
              "size_policy": size_policy, "split": split, "dtype": dtype, "shard_size": shard_size, "seed": seed,
              "rasa": str(rasa) if rasa else None}
    meta = run_metadata(config, protocol="features", weights=bb.weights_info)
    meta["backbone"] = backbone_record(bb)
    meta.pop("host", None)
    meta["fingerprint"] = fp
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


@command("attention")
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
    import torch

    from ..backbones import load_backbone
    from ..data.sources import ImageInput
    from ..io import atomic_write_text, run_metadata
    from ..viz import mass_threshold_mask, pca_rgb, save_grid, upsample_map

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
