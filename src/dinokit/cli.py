"""The ``dinokit`` command line.

Every command is a typed function in ``dinokit.commands.<group>``, registered there with ``@command``; this file
only builds the parser from that registry. jsonargparse turns each signature and docstring into ``--help``, ``--config
file.yaml`` and command-line overrides (later arguments win), and rejects unknown keys.

Errors never end in a raw traceback: :func:`main` prints ``error: <message>`` and ``hint: <fix>`` on stderr and
exits 2 for usage errors (bad options, jsonargparse's own argument errors) and 1 for runtime errors. ``--debug``
(anywhere on the command line) or ``DINOKIT_DEBUG=1`` prints the traceback too. See docs/cli.md.
"""

from __future__ import annotations

import os
import sys
import types
import typing


def components() -> dict:
    """The command tree {name: function | {name: function}}, as registered by the modules of ``dinokit.commands``."""
    from .commands import discover

    return discover()


# boolean options that may be given bare on the command line
_BOOL_FLAGS = {"skip_bad", "quick", "resume", "amp", "keep_aspect", "overwrite", "no_progress", "clip_boxes",
               "no_metrics", "trust_checkpoint"}
# options that must be positive numbers whenever given (checked before any work)
_POSITIVE = {"batch_size", "n_images", "shard_size", "image_size", "max_images", "size", "epochs", "n_views",
             "crop_size"}


def _target(argv: list[str]):
    """The command function named by the leading non-option tokens of ``argv`` (None when there is none)."""
    from .commands import REGISTRY, discover

    discover()
    words = []
    for tok in argv:
        if tok.startswith("-"):
            break
        words.append(tok)
    for n in range(len(words), 0, -1):
        fn = REGISTRY.get(tuple(words[:n]))
        if fn is not None:
            return fn
    return None


def _list_only_options(fn) -> set[str]:
    """Parameters of ``fn`` whose annotation takes a list/tuple but no scalar: a bare scalar there is wrapped."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation just disables the convenience
        return set()
    out = set()
    for name, tp in hints.items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        seq = any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in args)
        scalar = any(a in (int, float, str, bool) or typing.get_origin(a) is typing.Literal for a in args)
        if seq and not scalar:
            out.add(name)
    return out


def _check_positive(name: str, val: str) -> None:
    from .errors import UsageError

    try:
        v = float(val)
    except ValueError:
        return  # not a number: jsonargparse reports the type error, naming the option
    if not v > 0:
        raise UsageError(f"--{name} {val} must be positive", hint=f"pass a value >= 1 for --{name}")


def normalize_args(argv: list[str]) -> list[str]:
    """Accept ``--skip-bad`` for ``--skip_bad``, bare boolean flags (``--skip_bad`` -> ``--skip_bad=true``), a scalar
    for a list option (``--ks 7`` -> ``--ks [7]``), and reject non-positive sizes and counts naming the option."""
    try:
        lists = _list_only_options(_target(argv)) if argv else set()
    except Exception:  # noqa: BLE001 - the registry may be unavailable (e.g. a broken optional command module)
        lists = set()
    out: list[str] = []
    pending: str | None = None  # option name whose value is the next token
    for i, tok in enumerate(argv):
        if tok.startswith("--") and len(tok) > 2:
            name, eq, val = tok[2:].partition("=")
            name = name.replace("-", "_")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and name in _BOOL_FLAGS and (nxt is None or nxt.startswith("--")):
                out.append(f"--{name}=true")
                pending = None
                continue
            if eq:
                out.append(f"--{name}={_value(name, val, lists)}")
                pending = None
            else:
                out.append(f"--{name}")
                pending = name
            continue
        if pending is not None:
            tok = _value(pending, tok, lists)
            pending = None
        out.append(tok)
    return out


def _value(name: str, val: str, lists: set[str]) -> str:
    if name in _POSITIVE:
        for part in val.strip("[]()").split(","):
            if part.strip():
                _check_positive(name, part.strip())
    if name in lists and val and not val.lstrip().startswith(("[", "(")) and val.lower() not in ("null", "none"):
        return f"[{val}]"
    return val


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    flag = "--debug" in argv
    env = os.environ.get("DINOKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, [a for a in argv if a != "--debug"]


def report(err: BaseException, debug: bool = False) -> int:
    """Print ``error:`` / ``hint:`` lines for ``err`` on stderr (and the traceback when ``debug``); the exit code."""
    import traceback

    from .errors import DinokitError

    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    msg = str(err).strip() or type(err).__name__
    hint = getattr(err, "hint", None)
    if isinstance(err, DinokitError):
        code = err.exit_code
    elif isinstance(err, ValueError | OSError | RuntimeError | KeyError | ImportError):
        code = 1
    else:  # an unexpected exception type is a bug in dinokit: say so
        code = 1
        msg = f"{type(err).__name__}: {msg}"
        hint = hint or "this looks like a bug in dinokit; rerun with --debug and report the traceback"
    if isinstance(err, KeyError):
        msg = f"missing key {msg}"
    print(f"error: {msg}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    elif not debug:
        print("hint: rerun with --debug for the full traceback", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, *, catch: bool | None = None) -> int:
    """Entry point of the ``dinokit`` console script; returns the exit code.

    ``catch`` (default: True for the console script, i.e. ``argv=None``; False for a call with an explicit ``argv``,
    which raises the exception for the caller): turn exceptions into ``error:``/``hint:`` lines and an exit code.
    """
    catch = argv is None if catch is None else catch
    debug, raw = _debug(sys.argv[1:] if argv is None else list(argv))
    try:
        from jsonargparse import CLI

        args = normalize_args(raw)
        result = CLI(components(), args=args, as_positional=False, parser_mode="yaml", prog="dinokit")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if not catch:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every error becomes a message and an exit code
        if not catch:
            raise
        return report(err, debug)
    return int(result) if isinstance(result, int | bool) else 0


if __name__ == "__main__":
    sys.exit(main())
