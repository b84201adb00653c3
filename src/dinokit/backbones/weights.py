"""Weight resolution and loading (minimal core; see spec §8 for the full contract)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

from .registry import ModelSpec

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class WeightsUnavailableError(FileNotFoundError):
    """No weights could be found (offline) or downloaded; the message lists the ways out."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the architecture."""


def is_file(weights: str) -> bool:
    return isinstance(weights, str | os.PathLike) and (Path(weights).suffix in WEIGHT_SUFFIXES
                                                       or Path(weights).exists())


def name_from_file(weights: str) -> str:
    """The short name stored in a dinokit-format safetensors file."""
    if not is_file(weights) or Path(weights).suffix != ".safetensors":
        raise ValueError("name is required unless weights is a dinokit-format .safetensors file")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    if "name" not in meta:
        raise ValueError(f"{weights} has no dinokit metadata; pass the backbone name explicitly")
    return meta["name"]


def create_model(spec: ModelSpec, kwargs: dict, weights: str) -> nn.Module:
    """The timm module (never timm's downloader)."""
    return timm.create_model(spec.arch, **kwargs)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from .. import __version__

    return __version__


def load_weights(model: nn.Module, name: str, spec: ModelSpec, weights: str, **opts) -> dict:
    """Load ``weights`` into ``model`` in place; returns the provenance record ``weights_info``."""
    if weights == "random":
        log.warning("%s: explicitly random initialisation (weights='random')", name)
        return {"source": "random", "name": name, "arch": spec.arch, "dinokit_version": _version()}
    if is_file(weights):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointMismatchError(f"{path}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
        return {"source": "file", "path": str(path), "sha256": sha256(path), "layout": "timm",
                "dinokit_version": _version()}
    raise WeightsUnavailableError(
        f"weights {weights!r} for {name} ({spec.arch}) are not available here. Ways out: (1) fill the Hugging "
        f"Face cache once with network access: `hf download timm/{spec.arch}.{spec.tag}`; (2) pass a local file: "
        "weights='/path/to/file.pth'; (3) ask for an explicitly random initialisation: weights='random'")
