"""The ``dinokit`` command line.

Every command is a typed function in the module that owns it; this file only maps command names to
those functions. jsonargparse turns each signature and docstring into ``--help``, ``--config
file.yaml`` and command-line overrides (later arguments win), and rejects unknown keys.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# name -> "module:function", or a nested mapping for command groups. A command whose module is not
# importable (an optional extra that is not installed) is left out of the command line.
COMMANDS: dict[str, object] = {
    "demo": "dinokit.demo:demo",
    "synth": "dinokit.data.commands:synth",
    "data": {"prepare": "dinokit.data.commands:prepare"},
    "features": "dinokit.backbones.commands:features",
    "attention": "dinokit.backbones.commands:attention",
    "eval": {
        "overcluster": "dinokit.eval.commands:overcluster",
        "linear": "dinokit.eval.commands:linear",
        "hummingbird": "dinokit.eval.commands:hummingbird",
        "position": "dinokit.eval.commands:position",
        "entropy": "dinokit.eval.commands:entropy",
        "boxes": "dinokit.eval.commands:boxes",
    },
    "rasa": {
        "fit": "dinokit.methods.rasa_commands:fit",
        "apply": "dinokit.methods.rasa_commands:apply",
        "convert": "dinokit.methods.rasa_commands:convert",
        "inspect": "dinokit.methods.rasa_commands:inspect",
    },
    "boxes": "dinokit.data.crops_commands:boxes",
    "crops": {"maiou-curve": "dinokit.data.crops_commands:maiou_curve",
              "density-cache": "dinokit.data.crops_commands:density_cache"},
    "classify": {"fit": "dinokit.methods.classifier_commands:fit"},
    "bt": {"fit": "dinokit.methods.barlow_twins_commands:fit"},
    "seg": {"fit": "dinokit.methods.seg_heads_commands:fit"},
    "viz": {
        "erf": "dinokit.viz.commands:erf",
        "attention": "dinokit.viz.commands:attention",
        "ccm": "dinokit.viz.commands:ccm",
    },
    "neco": {
        "fit": "dinokit.methods.neco_commands:fit",
        "export": "dinokit.methods.neco_commands:export",
    },
}


def _resolve(spec: object) -> Callable | dict | None:
    if isinstance(spec, dict):
        out = {k: v for k, v in ((k, _resolve(s)) for k, s in spec.items()) if v is not None}
        return out or None
    module, func = str(spec).split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            return None  # this command's module is not part of this installation
        raise
    return getattr(mod, func)


def components() -> dict:
    """The resolved command tree (functions by name)."""
    return _resolve(COMMANDS) or {}


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
