"""Feature shards: what ``dinokit features`` writes and every consumer reads.

A feature directory holds ``shard-KKKKK.safetensors`` files and, once complete, ``manifest.json``. Shard k
covers dataset positions [k*S, (k+1)*S) (S = images per shard) minus bad files, whatever the number of
processes, so 1 and N processes write identical shards. Tensors: ``patch`` (n, h, w, D), ``cls`` (n, D) (absent
for ResNet), ``registers`` (n, R, D), ``grid`` (2,), ``index`` (n,) dataset positions. String metadata:
``image_ids`` (JSON list), ``config``, ``versions``, ``weights``, ``backbone``, ``fingerprint`` (JSON),
``dinokit_format``. The fingerprint holds every option that changes a shard's bytes; a resumed run keeps a shard only
when its fingerprint matches. Files are byte-reproducible: the header is written with sorted keys and holds no time
or host name (the creation time goes into ``manifest.json`` only).
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
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    md = {"dinokit_format": SHARD_FORMAT, "image_ids": json.dumps(image_ids)}
    md.update({k: json.dumps(v, default=str, sort_keys=True) for k, v in meta.items()})
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=md)
    atomic_write_bytes(path, canonical_safetensors(blob))


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header re-serialised with sorted keys (safetensors writes the
    header from a hash map, whose order changes between processes). Tensor data and offsets are unchanged."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def shard_fingerprint(path: Path) -> dict | None:
    """The ``fingerprint`` stored in a shard (None for an unreadable file, another format, or no fingerprint)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file counts as no shard
        return None
    if md.get("dinokit_format") != SHARD_FORMAT:
        return None
    return json.loads(md.get("fingerprint", "{}"))


def shard_is_complete(path: Path, fingerprint: dict | None = None) -> bool:
    """True when ``path`` is a readable shard of this format and, when ``fingerprint`` is given, made with exactly
    that fingerprint (resume skips it; a shard of other options is never kept)."""
    fp = shard_fingerprint(path)
    if fp is None:
        return False
    return fingerprint is None or _canon(fp) == _canon(fingerprint)


def _canon(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


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


class LazyFeatureDir:
    """A ``dinokit features`` directory opened without reading any tensor: only the shards' metadata.

    ``patch_of(ids)`` reads the (len(ids), h, w, D) fp32 patch tokens of those image ids, row by row from the
    shard files (safetensors slices), so memory holds one batch however large the directory is. Checks as
    :func:`load_feature_dir` (one backbone and grid across shards, ``expect_backbone`` / ``expect_grid``).
    """

    def __init__(self, path: str | Path, expect_backbone: str | None = None,
                 expect_grid: tuple[int, int] | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("shard-*.safetensors"))
        if not files:
            raise ValueError(f"{self.path} holds no feature shards (shard-*.safetensors); run `dinokit features` "
                             "first")
        self.files = files
        self.where: dict[str, tuple[int, int]] = {}
        self.meta: dict = {}
        self.grid: tuple[int, int] | None = None
        for fi, f in enumerate(files):
            with safe_open(str(f), "pt") as h:
                md = h.metadata() or {}
                if md.get("dinokit_format") != SHARD_FORMAT:
                    raise ValueError(f"{f} is not a dinokit feature shard (format {md.get('dinokit_format')!r})")
                grid = tuple(int(g) for g in h.get_tensor("grid").tolist())
            meta = {k: json.loads(v) for k, v in md.items() if k not in ("dinokit_format", "image_ids")}
            if fi == 0:
                self.meta, self.grid = meta, grid
            elif meta.get("backbone", {}).get("name") != self.meta.get("backbone", {}).get("name") or \
                    grid != self.grid:
                raise ValueError(f"{f} comes from another backbone or grid than {files[0]}")
            for r, i in enumerate(json.loads(md["image_ids"])):
                self.where[str(i)] = (fi, r)
        name = self.meta.get("backbone", {}).get("name")
        if expect_backbone is not None and name != expect_backbone:
            raise ValueError(f"features in {self.path} were made by backbone {name!r}, not {expect_backbone!r} as "
                             "configured; recompute them or fix --backbone")
        if expect_grid is not None and tuple(expect_grid) != self.grid:
            raise ValueError(f"features in {self.path} have grid {self.grid}, not {tuple(expect_grid)} as "
                             "configured; recompute them at the configured size")

    @property
    def image_ids(self) -> list[str]:
        return list(self.where)

    def missing(self, ids: list[str]) -> list[str]:
        """The ids that no shard holds."""
        return [i for i in ids if str(i) not in self.where]

    def patch_of(self, ids: list[str]) -> torch.Tensor:
        """(len(ids), h, w, D) fp32 patch tokens of ``ids`` (KeyError names an id no shard holds)."""
        from safetensors import safe_open

        rows: list[torch.Tensor | None] = [None] * len(ids)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for j, i in enumerate(ids):
            if str(i) not in self.where:
                raise KeyError(f"image id {i!r} is in no shard of {self.path}")
            fi, r = self.where[str(i)]
            by_file.setdefault(fi, []).append((j, r))
        for fi, pairs in by_file.items():
            with safe_open(str(self.files[fi]), "pt") as h:
                sl = h.get_slice("patch")
                for j, r in pairs:
                    rows[j] = sl[r:r + 1].float()
        return torch.cat(rows)  # type: ignore[arg-type]
