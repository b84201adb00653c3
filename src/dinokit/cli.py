"""The ``dinokit`` command line.

Every command is a typed function in ``dinokit.commands.<group>``, registered there with ``@command``; this file
only builds the parser from that registry. jsonargparse turns each signature and docstring into ``--help``, ``--config
file.yaml`` and command-line overrides (later arguments win), and rejects unknown keys.
"""

from __future__ import annotations

import sys


def components() -> dict:
    """The command tree {name: function | {name: function}}, as registered by the modules of ``dinokit.commands``."""
    from .commands import discover

    return discover()


def normalize_args(argv: list[str]) -> list[str]:
    """Accept ``--skip-bad`` for ``--skip_bad`` and bare boolean flags (``--skip_bad`` -> ``--skip_bad=true``)."""
    out = []
    for i, tok in enumerate(argv):
        if tok.startswith("--") and len(tok) > 2:
            name, eq, val = tok[2:].partition("=")
            tok = "--" + name.replace("-", "_") + eq + val
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and name.replace("-", "_") in _BOOL_FLAGS and (nxt is None or nxt.startswith("--")):
                tok += "=true"
        out.append(tok)
    return out


# boolean options that may be given bare on the command line
_BOOL_FLAGS = {"skip_bad", "quick", "resume", "amp", "keep_aspect", "overwrite", "no_progress"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dinokit`` console script."""
    from jsonargparse import CLI

    args = normalize_args(sys.argv[1:] if argv is None else list(argv))
    result = CLI(components(), args=args, as_positional=False, parser_mode="yaml", prog="dinokit")
    return int(result) if isinstance(result, int | bool) else 0


if __name__ == "__main__":
    sys.exit(main())
