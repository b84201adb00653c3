"""Every file under configs/<group>/ is a valid --config of its command: it names only that command's parameters.

The command is ``<group> fit`` for the trainer groups and ``eval <first word of the file name>`` for evaluations.
"""

import inspect
from pathlib import Path

import pytest
import yaml

from dinokit.cli import components

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*/*.yaml"))


def _command(path: Path):
    tree = components()
    group = path.parent.name
    assert group in tree, f"configs/{group}/ has no `dinokit {group}` command group"
    if group == "eval":
        return tree["eval"][path.stem.split("_")[0]]
    if group == "demo":
        name = path.stem
        return tree[name] if name in tree else tree["bt"]["fit"]
    return tree[group]["fit"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_keys_are_command_parameters(path):
    fn = _command(path)
    params = set(inspect.signature(fn).parameters)
    keys = set(yaml.safe_load(path.read_text()) or {})
    assert keys <= params, f"{path.relative_to(ROOT)}: unknown keys {sorted(keys - params)}"


def test_every_group_has_configs():
    groups = {p.parent.name for p in CONFIGS}
    assert {"eval", "rasa", "neco", "bt", "seg", "classify"} <= groups
    assert not list(ROOT.glob("*.yaml")), "configs live in configs/<command group>/"
