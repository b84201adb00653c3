"""Feature shards: what ``dinokit features`` writes and every consumer reads.

A feature directory holds ``shard-KKKKK.safetensors`` files and, once complete, ``manifest.json``. Shard k
covers dataset positions [k*S, (k+1)*S) (S = images per shard) minus bad files, whatever the number of
processes, so 1 and N processes write identical shards. Tensors: ``patch`` (n, h, w, D), ``cls`` (n, D) (absent
for ResNet), ``registers`` (n, R, D), ``grid`` (2,), ``index`` (n,) dataset positions. String metadata:
``image_ids`` (JSON list), ``config``, ``versions``, ``weights``, ``backbone`` (JSON), ``dinokit_format``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHARD_FORMAT = "dinokit-features-1"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], image_ids: list[str], meta: dict) -> None:
    """Write one shard atomically (temp file + rename): a killed run never leaves a partial shard."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    md = {"dinokit_format": SHARD_FORMAT, "image_ids": json.dumps(image_ids)}
    md.update({k: json.dumps(v, default=str) for k, v in meta.items()})
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=md)


def shard_is_complete(path: Path) -> bool:
    """True when ``path`` is a readable shard of this format (resume skips it)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("dinokit_format") == SHARD_FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file is redone
        return False


@dataclass
class FeatureSet:
    """Features of a whole directory, concatenated in dataset order.

    patch: (N, h, w, D); cls: (N, D) or None; registers: (N, R, D); grid: (h, w); index: (N,);
    image_ids: N ids; meta: the first shard's metadata (config, versions, weights, backbone).
    """

    patch: torch.Tensor
    cls: torch.Tensor | None
    registers: torch.Tensor
    grid: tuple[int, int]
    index: torch.Tensor
    image_ids: list[str]
    meta: dict = field(default_factory=dict)


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
        if md.get("dinokit_format") != SHARD_FORMAT:
            raise ValueError(f"{path} is not a dinokit feature shard (format {md.get('dinokit_format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    ids = json.loads(md.pop("image_ids"))
    meta = {k: json.loads(v) for k, v in md.items() if k != "dinokit_format"}
    return tensors, ids, meta


def load_feature_dir(path: str | Path, expect_backbone: str | None = None,
                     expect_grid: tuple[int, int] | None = None) -> FeatureSet:
    """Read every shard of a ``dinokit features`` output directory.

    Raises ValueError when the directory has no shards, when shards disagree on backbone or grid, or when they
    differ from ``expect_backbone`` / ``expect_grid`` (features from another model or input size).
    """
    path = Path(path)
    files = sorted(path.glob("shard-*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no feature shards (shard-*.safetensors); run `dinokit features` first")
    parts, ids, meta0 = [], [], None
    for f in files:
        t, i, m = read_shard(f)
        if meta0 is None:
            meta0 = m
        elif m.get("backbone", {}).get("name") != meta0.get("backbone", {}).get("name") or \
                t["grid"].tolist() != parts[0]["grid"].tolist():
            raise ValueError(f"{f} comes from another backbone or grid than {files[0]}")
        parts.append(t)
        ids.extend(i)
    grid = tuple(int(g) for g in parts[0]["grid"].tolist())
    name = (meta0 or {}).get("backbone", {}).get("name")
    if expect_backbone is not None and name != expect_backbone:
        raise ValueError(f"features in {path} were made by backbone {name!r}, not {expect_backbone!r} as configured; "
                         "recompute them or fix --backbone")
    if expect_grid is not None and tuple(expect_grid) != grid:
        raise ValueError(f"features in {path} have grid {grid}, not {tuple(expect_grid)} as configured; "
                         "recompute them at the configured size")
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "grid"}
    order = cat["index"].argsort()
    ids = [ids[i] for i in order.tolist()]
    return FeatureSet(patch=cat["patch"][order], cls=cat["cls"][order] if "cls" in cat else None,
                      registers=cat["registers"][order], grid=grid, index=cat["index"][order], image_ids=ids,
                      meta=meta0 or {})
