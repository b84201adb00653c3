"""Atomic writes and the provenance block recorded in every result file."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_path(path: str | Path):
    """Context manager yielding a temp path next to ``path``; renamed onto ``path`` on success."""
    from contextlib import contextmanager

    @contextmanager
    def _cm():
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=p.suffix + ".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, p)
        finally:
            Path(tmp).unlink(missing_ok=True)

    return _cm()


def versions() -> dict[str, str]:
    """Versions of dinokit and the libraries that shape its numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dinokit", "torch", "torchvision", "timm", "lightning", "faiss-cpu", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(config: dict, protocol: str, weights: dict | None = None) -> dict:
    """The ``meta`` block of a result file: config, protocol, weights provenance and versions."""
    return {"config": config, "protocol": protocol, "weights": weights or {}, "versions": versions(),
            "host": platform.node()}
