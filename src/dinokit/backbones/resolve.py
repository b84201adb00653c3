"""Where the weights of a name come from: the shipped assets, the Hugging Face and torch-hub caches (downloads only
when online), a local file; then model creation and strict loading. See docs/backbones.md#resolution-order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..io import dinokit_version
from .registry import ASSETS, ModelSpec
from .weights import (
    HF_FILES,
    Checkpoint,
    WeightsUnavailableError,
    _stored_grid,
    _summarise,
    is_file,
    is_offline,
    load_into,
    log,
    read_file,
    sha256,
    unwrap,
)


def _pretrained_cfg(arch: str, tag: str):
    try:
        return timm.models.get_pretrained_cfg(f"{arch}.{tag}")
    except RuntimeError:  # timm raises on an unknown tag
        return None


def hf_repo_id(spec: ModelSpec, tag: str) -> str:
    """``timm/<arch>.<tag>`` (timm's ``hf_hub_id`` of the tag)."""
    cfg = _pretrained_cfg(spec.arch, tag)
    if cfg is None:
        known = [n.partition(".")[2] for n in timm.list_pretrained(f"{spec.arch}.*")]
        raise ValueError(f"{spec.arch} has no pretrained tag {tag!r}; known tags: {', '.join(known) or 'none'}")
    hub = cfg.hf_hub_id or f"timm/{spec.arch}.{tag}"
    if hub.endswith("/"):
        hub = f"{hub}{spec.arch}.{tag}"
    return hub


def torch_hub_file(name: str, spec: ModelSpec, tag: str) -> Path:
    """``<torch hub dir>/checkpoints/<basename of the official URL>`` (DINOv3: the ``-*`` hashed name pattern)."""
    d = Path(torch.hub.get_dir()) / "checkpoints"
    cfg = _pretrained_cfg(spec.arch, tag)
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url:
        return d / url.rsplit("/", 1)[-1]
    return d / f"{name}_pretrain_{tag}-*.pth"


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _unavailable(name: str, spec: ModelSpec, tag: str, repo: str, cache: str, hub_file: Path, why: str) -> str:
    url = None
    cfg = _pretrained_cfg(spec.arch, tag)
    if cfg is not None and getattr(cfg, "url", None):
        url = cfg.url
    official = (f" (official URL: {url})" if url else
                " (DINOv3 official files are gated: use the timm/ copies)" if spec.family == "dinov3" else "")
    return (
        f"weights for {name} (timm {spec.arch}.{tag}) are not available: {why}.\n"
        f"Looked in: the Hugging Face cache {cache} for repo {repo} (files {HF_FILES[0]}, {HF_FILES[1]}); "
        f"the torch hub file {hub_file}.\n"
        "Ways out:\n"
        f"  1. fill the cache once with network access: `hf download {repo}` (older huggingface_hub: "
        f"`huggingface-cli download {repo}`), or point HF_HOME / cache_dir at a directory that has it;\n"
        f"  2. pass a local file in an official or timm layout: weights=\"/path/to/{hub_file.name}\"{official};\n"
        "  3. ask for an explicitly random initialisation: weights=\"random\".")


def resolve_tag(name: str, spec: ModelSpec, tag: str, *, offline: bool | None = None,
                cache_dir: str | None = None) -> tuple[Path, dict]:
    """Find the file of ``tag``: HF cache, torch hub cache, then (online) a download. Returns (path, info)."""
    repo = hf_repo_id(spec, tag)
    cache = _hf_cache_dir(cache_dir)
    from huggingface_hub import try_to_load_from_cache

    for fname in HF_FILES:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit), {"source": "hf-cache", "repo_id": repo, "tag": tag, "file": fname,
                               "revision": Path(hit).parent.name, "path": hit}
    hub_file = torch_hub_file(name, spec, tag)
    hits = sorted(hub_file.parent.glob(hub_file.name)) if "*" in hub_file.name else (
        [hub_file] if hub_file.is_file() else [])
    if hits:
        return hits[0], {"source": "torch-hub-cache", "path": str(hits[0]), "tag": tag, "sha256": sha256(hits[0])}
    if is_offline(offline):
        raise WeightsUnavailableError(_unavailable(name, spec, tag, repo, cache, hub_file,
                                                   "offline mode and nothing found in the caches"))
    from huggingface_hub import hf_hub_download

    errors = []
    for fname in HF_FILES:
        try:
            p = hf_hub_download(repo, fname, cache_dir=cache_dir)
            return Path(p), {"source": "hf-download", "repo_id": repo, "tag": tag, "file": fname,
                             "revision": Path(p).parent.name, "path": str(p)}
        except Exception as e:  # noqa: BLE001 - every failure ends in the same clear error
            errors.append(f"{fname}: {type(e).__name__}: {e}")
    raise WeightsUnavailableError(_unavailable(name, spec, tag, repo, cache, hub_file,
                                               "the download failed (" + "; ".join(errors) + ")"))


def shipped_asset(name: str, tag: str) -> tuple[Path, dict] | None:
    """(path, info) of the weights of ``name``/``tag`` shipped in ``dinokit/backbones/assets`` (None when the pair
    ships none); ``info["provenance"]`` carries the training record of the JSON beside the file."""
    fname = ASSETS.get((name, tag))
    if fname is None:
        return None
    path = Path(__file__).parent / "assets" / fname
    if not path.is_file():
        raise WeightsUnavailableError(
            f"the shipped weights of {name} (tag {tag!r}) are missing: {path} does not exist. Reinstall dinokit with "
            "its package data (backbones/assets/*), regenerate them with `dinokit pretrain --config "
            "configs/demo/pretrain.yaml` and copy the file there, or pass weights='random'")
    info: dict = {"source": "dinokit-asset", "path": str(path), "tag": tag, "sha256": sha256(path)}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        prov = json.loads(sidecar.read_text())
        info["provenance"] = {k: prov[k] for k in ("sha256", "seed", "steps", "images_seen", "wall_seconds", "data",
                                                   "weights") if k in prov}
        info["provenance"]["config"] = prov.get("meta", {}).get("config", {})
        if prov.get("sha256") not in (None, info["sha256"]):
            log.warning("%s: sha256 %s differs from the one recorded in %s (%s)", path, info["sha256"], sidecar,
                        prov.get("sha256"))
    return path, info


def read_checkpoint(name: str, spec: ModelSpec, weights: Any, *, tag: str | None = None,
                    offline: bool | None = None, cache_dir: str | None = None, which: str = "teacher",
                    key: str | None = None, trust_checkpoint: bool = False) -> Checkpoint | None:
    """Resolve and read ``weights`` (None for ``"random"``) into an unwrapped :class:`Checkpoint`."""
    if isinstance(weights, str) and weights == "random":
        return None
    from .hf import read_transformers  # transformers folders / repo ids (None: anything else)

    hf = read_transformers(name, spec, weights, offline=offline, cache_dir=cache_dir, which=which, key=key,
                           trust_checkpoint=trust_checkpoint)
    if hf is not None:
        return hf
    if is_file(weights):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; pass an existing file, a tag "
                                    "('pretrained'), or weights='random'")
        info = {"source": "file", "path": str(path), "sha256": sha256(path)}
    else:
        t = (tag or spec.tag) if weights == "pretrained" else weights
        if t is None:
            raise ValueError(f"{name} ({spec.arch}) has no default pretrained tag; pass tag=..., a file, or "
                             "weights='random'")
        asset = shipped_asset(name, t)
        path, info = asset if asset is not None else resolve_tag(name, spec, t, offline=offline, cache_dir=cache_dir)
    obj, meta = read_file(path, trust_checkpoint=trust_checkpoint)
    sd, steps, dropped = unwrap(obj, key=key, which=which, where=str(path))
    if dropped:
        log.info("%s: dropped outside the chosen group: %s", path, _summarise(dropped))
    info.update(which=which, unwrap=steps)
    if meta.get("dinokit_format"):
        info["exported_from"] = meta.get("source", "")
    ck = Checkpoint(sd, info, meta)
    ck.info["dropped_unwrap"] = _summarise(dropped)
    return ck


def create_model(spec: ModelSpec, kwargs: dict, weights: Any = None, ckpt: Checkpoint | None = None,
                 keep_img_size: bool = False) -> nn.Module:
    """The timm module (``pretrained=False``: never timm's downloader). For absolute-position ViTs the image size
    is the stored grid × p of the checkpoint (unless ``keep_img_size``), so the stored table loads unchanged."""
    kwargs = dict(kwargs, pretrained=False)
    if ckpt is not None and not keep_img_size:
        M = _stored_grid(ckpt.state_dict)
        pw = ckpt.state_dict.get("patch_embed.proj.weight")
        if M is not None and pw is not None and pw.ndim == 4:
            kwargs["img_size"] = M * int(pw.shape[-1])
    return timm.create_model(spec.arch, **kwargs)


def load_weights(model: nn.Module, name: str, spec: ModelSpec, weights: Any, *, ckpt: Checkpoint | None = None,
                 drop_registers: bool = False, **opts) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load ``weights`` into ``model`` in place; returns (``weights_info``, kept-aside tensors)."""
    if isinstance(weights, str) and weights == "random":
        log.warning("%s: explicitly random initialisation (weights='random')", name)
        return {"source": "random", "name": name, "arch": spec.arch, "tag": None, "layout": None,
                "dinokit_version": dinokit_version()}, {}
    if ckpt is None:
        ckpt = read_checkpoint(name, spec, weights, **opts)
    info, kept = load_into(model, ckpt, name, spec, drop_registers=drop_registers)
    info.update(name=name, arch=spec.arch, tag=info.get("tag", spec.tag))
    dropped = info.pop("dropped_unwrap", [])
    info["dropped"] = dropped + info["dropped"]
    return info, kept
