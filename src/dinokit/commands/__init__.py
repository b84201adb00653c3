"""The command layer: one module per command group, each registering its functions where they are defined.

A command is a typed function whose signature and docstring jsonargparse turns into ``--help``, ``--config`` and
command-line overrides. Register it with :func:`command`; :func:`discover` imports every module of this package
and returns the command tree that ``dinokit.cli`` hands to jsonargparse, so adding a command never edits
``cli.py``. Command modules import the library inside their functions (torch, timm and Lightning are slow to
import), so building the parser for ``dinokit --help`` stays fast. Nothing in the library imports this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

# "group name" or "name" -> function, in registration order
REGISTRY: dict[tuple[str, ...], Callable] = {}
# group -> one-line description shown by ``dinokit --help``
GROUPS: dict[str, str] = {}


def group(name: str, description: str) -> None:
    """Declare a command group and its one-line description (``dinokit --help`` lists it)."""
    GROUPS[name] = description


def command(name: str) -> Callable[[F], F]:
    """Register the decorated function as ``dinokit <name>`` (``"eval overcluster"`` for a group member)."""
    path = tuple(name.split())

    def register(fn: F) -> F:
        if path in REGISTRY and REGISTRY[path] is not fn:
            raise RuntimeError(f"command {name!r} is registered twice ({REGISTRY[path].__module__} and "
                               f"{fn.__module__})")
        REGISTRY[path] = fn
        return fn

    return register


def discover() -> dict:
    """Import every command module and return the tree {name: function | {name: function}}.

    A module whose optional dependency is missing (``ModuleNotFoundError`` of a package that is not dinokit) is
    left out, so a command of an extra that is not installed simply does not appear.
    """
    for info in pkgutil.iter_modules(__path__):
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ModuleNotFoundError as err:
            if err.name and not err.name.startswith("dinokit"):
                continue
            raise
    tree: dict = {}
    for path, fn in REGISTRY.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = fn
    return tree
