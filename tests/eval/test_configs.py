"""configs/eval_*.yaml name only parameters of their `dinokit eval` command."""

import inspect
from pathlib import Path

import pytest
import yaml

from dinokit.eval import commands

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("eval_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_command_parameters(path):
    name = path.stem.split("_")[1]
    fn = getattr(commands, name)
    params = set(inspect.signature(fn).parameters)
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= params, keys - params


def test_there_are_configs():
    assert len(CONFIGS) >= 6
