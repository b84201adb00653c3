"""Atomic writes and the provenance block recorded in every result file."""

from __future__ import annotations

import os
import platform
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_next_to(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create ``.<name>.<random><suffix>`` beside ``path`` (O_EXCL) and return (fd, temp path).

    Unlike ``tempfile.mkstemp`` (always 0600) the file is created with mode 0666 filtered by the process umask,
    i.e. the mode a plain ``open(path, "w")`` gives a new file (0644 under umask 022); see :func:`_keep_mode` for
    an existing ``path``.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _keep_mode(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the permission bits of an existing ``path`` (rewriting a file in place keeps its mode); applied
    after writing, so a read-only target can still be replaced."""
    try:
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    except FileNotFoundError:
        pass


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash; a no-op where directories cannot be opened or
    synced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, an atomic rename and an fsync of the
    folder. The file gets the mode a plain ``open()`` would give it (see :func:`_temp_next_to`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_next_to(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _keep_mode(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Context manager yielding a temp path next to ``path`` for a writer that takes a file name (safetensors,
    ``torch.save``, ``savefig``); on success the file is fsynced and renamed onto ``path`` and the folder fsynced,
    on failure it is removed. Mode as with :func:`atomic_write_bytes`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_next_to(p, suffix=p.suffix + ".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _keep_mode(tmp, p)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(p.parent)


def make_temp_dir(parent: str | Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A new folder ``<parent>/<prefix><random><suffix>`` with the mode a plain ``mkdir`` gives (0777 filtered by
    the umask: 0755 under umask 022), unlike ``tempfile.mkdtemp`` (always 0700), for folders renamed into place."""
    for _ in range(100):
        d = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            d.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return d
    raise FileExistsError(f"could not create a temporary folder in {parent}")


def dinokit_version() -> str:
    """The one version reader: ``dinokit.__version__`` (the package metadata is generated from it)."""
    from . import __version__

    return __version__


def versions() -> dict[str, str]:
    """Versions of dinokit and the libraries that shape its numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "dinokit": dinokit_version()}
    for pkg in ("torch", "torchvision", "timm", "lightning", "faiss-cpu", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(config: dict, protocol: str, weights: dict | None = None) -> dict:
    """The ``meta`` block of a result file: config, protocol, weights provenance and versions."""
    return {"config": config, "protocol": protocol, "weights": weights or {}, "versions": versions(),
            "host": platform.node()}
