"""Shared fixtures: deterministic torch, small thread count, offline hub."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on tiny tensors: one intra-op thread avoids OpenMP spinning on a shared 2-core machine (measured
    up to 10x slower with 2 threads) and makes results independent of the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
