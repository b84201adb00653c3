"""The errors dinokit raises on bad input or stale state, and the checks that raise them before any work is done.

Every :class:`DinokitError` carries a ``hint`` (how to fix it) and an ``exit_code``: 2 for a usage error (a bad
option), 1 for a runtime error (bad data, a stale output folder, an impossible box). ``dinokit.cli.main`` prints
``error: <message>`` and ``hint: <hint>`` and exits with that code (see docs/cli.md). The classes subclass
``ValueError`` (``FileNotFoundError`` for :class:`MissingFileError`) so library callers that catch those keep
working. This module sits in the lowest layer: it imports nothing from dinokit.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path


class DinokitError(Exception):
    """Base of dinokit's named errors: ``str(err)`` is the message, ``err.hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(DinokitError, ValueError):
    """An option has a value that cannot work (exit 2). The message names the option."""

    exit_code = 2


class DataError(DinokitError, ValueError):
    """The input data is unreadable or lacks what the command needs (exit 1)."""


class MissingFileError(DinokitError, FileNotFoundError):
    """A file the command needs (ground truth, a checkpoint, a box file) does not exist (exit 1)."""


class StaleOutputError(DinokitError, ValueError):
    """The output folder holds results made with other options; mixing them would give a wrong answer (exit 1)."""


class BoxError(DinokitError, ValueError):
    """A box lies outside its image, has zero or negative size, or is not finite (exit 1)."""


def check_positive(value: float | int | None, option: str, *, allow_none: bool = True) -> None:
    """Raise :class:`UsageError` naming ``option`` unless ``value`` is > 0 (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return
    vals = value if isinstance(value, list | tuple) else [value]
    for v in vals:
        if v is None or isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise UsageError(f"{option} {value!r} must be positive", hint=f"pass a value >= 1, e.g. {option} 1")


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Check that ``path`` can be (or already is) a writable folder; create it. Raises :class:`UsageError`.

    Catches, before any forward pass: ``path`` (or one of its parents) being a file, and a folder that cannot be
    written (a probe file is created and removed).
    """
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise UsageError(f"{option} {p}: {q} is a file, not a folder",
                             hint=f"pass another {option} or move the file {q} away")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".dinokit-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{option} {p} is not writable: {err.strerror or err}",
                         hint=f"pass a writable {option} folder") from err
    return p


def check_out_file(path: str | Path, option: str = "--out") -> Path:
    """Check that the output file ``path`` is not a folder and that its parent folder is writable."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p} is a folder, not a file", hint=f"pass a file name, e.g. {option} {p / 'out'}")
    check_out_dir(p.parent, option)
    return p


def _nan_to_null(obj, path: str, found: list[str]):
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(path or "<root>")
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v, f"{path}/{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_null(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def strict_json(obj, *, indent: int | None = 1, sort_keys: bool = False, warn: bool = True) -> str:
    """``json.dumps`` that always writes valid JSON: NaN and +-inf become ``null`` (with a warning naming the keys),
    numpy scalars and paths are converted, and ``allow_nan=False`` guards the rest."""
    found: list[str] = []
    clean = _nan_to_null(json.loads(json.dumps(obj, default=_default)), "", found)
    if found and warn:
        warnings.warn(f"{len(found)} non-finite value(s) written as null: {found[:5]}", stacklevel=2)
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, allow_nan=False)


def _default(o):
    if hasattr(o, "item") and callable(o.item):
        try:
            return o.item()
        except (TypeError, ValueError):
            pass
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def differing(old: dict, new: dict, keys: Iterable[str] | None = None) -> list[str]:
    """Names of the keys whose values differ between two fingerprints (all keys of both when ``keys`` is None)."""
    names = sorted(set(old) | set(new)) if keys is None else list(keys)
    return [k for k in names if old.get(k) != new.get(k)]
