"""Soft sorting networks: parity with diffsort, doubly stochastic, ascending, hard limit, bad input."""

from __future__ import annotations

import pytest
import torch
from diffsort import DiffSortNet
from hypothesis import given, settings
from hypothesis import strategies as st

from dinokit.methods.neco.softsort import SoftSort, network, soft_sort


def _diffsort(net: str, n: int, s: float, dtype: torch.dtype) -> DiffSortNet:
    ds = DiffSortNet(net, n, steepness=s)
    ds.sorting_network = [[m.to(dtype) for m in t] for t in ds.sorting_network]
    return ds


def _value_and_grad(f, x: torch.Tensor, wy: torch.Tensor | None = None, wP: torch.Tensor | None = None):
    x = x.detach().clone().requires_grad_()
    y, P = f(x)
    wy = torch.randn_like(y) if wy is None else wy
    wP = torch.randn_like(P) if wP is None else wP
    (g,) = torch.autograd.grad((y * wy).sum() + (P * wP).sum(), x)
    return y.detach(), P.detach(), g, wy, wP


CASES = [(net, n, s) for net in ("bitonic", "odd_even") for n in (4, 7, 16, 49) for s in (1.0, 10.0, 100.0, 1000.0)
         if not (net == "odd_even" and n == 49 and s != 100.0)]  # odd-even n = 49: 49 dense diffsort layers


@pytest.mark.parametrize(("net", "n", "s"), CASES)
def test_parity_with_diffsort_float64(net: str, n: int, s: float) -> None:
    torch.manual_seed(n * 31 + int(s))
    x = torch.rand(6, n, dtype=torch.float64) * 2 - 1
    y0, P0, g0, wy, wP = _value_and_grad(_diffsort(net, n, s, torch.float64), x)
    y1, P1, g1, _, _ = _value_and_grad(lambda z: soft_sort(z, s, net), x, wy, wP)
    assert (y0 - y1).abs().max() <= 1e-5
    assert (P0 - P1).abs().max() <= 1e-5
    assert (g0 - g1).abs().max() <= 1e-5 * g0.abs().max()


@pytest.mark.parametrize(("net", "s"), [("bitonic", 100.0), ("bitonic", 1000.0), ("odd_even", 100.0)])
def test_parity_float32_within_diffsort_own_error(net: str, s: float) -> None:
    torch.manual_seed(1)
    n = 49
    x = torch.rand(4, n, dtype=torch.float64) * 2 - 1
    _, P64 = _diffsort(net, n, s, torch.float64)(x)
    _, P32 = DiffSortNet(net, n, steepness=s)(x.float())
    own = (P32.double() - P64).abs().max().item()
    _, P = soft_sort(x.float(), s, net)
    assert P.dtype == torch.float32
    assert (P.double() - P32.double()).abs().max() <= max(1e-4, 3 * own)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 40), s=st.sampled_from([1.0, 30.0, 100.0, 1e4]), seed=st.integers(0, 10_000),
       net=st.sampled_from(["bitonic", "odd_even"]))
def test_doubly_stochastic_and_y_equals_xP(n: int, s: float, seed: int, net: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(5, n, generator=g) * 2 - 1) * 3
    y, P = soft_sort(x, s, net)
    assert (P >= 0).all()
    assert torch.allclose(P.sum(-1), torch.ones(5, n), atol=1e-5)
    assert torch.allclose(P.sum(-2), torch.ones(5, n), atol=1e-5)
    assert torch.allclose(y, (x.unsqueeze(-2) @ P).squeeze(-2), atol=1e-5)


def test_ascending() -> None:
    n = 49
    vals = -1.2 + 0.05 * torch.arange(n, dtype=torch.float64)
    x = torch.stack([vals[torch.randperm(n, generator=torch.Generator().manual_seed(i))] for i in range(4)])
    y, _ = soft_sort(x, 100.0)
    assert (y[:, 1:] - y[:, :-1] >= -1e-6).all()


@pytest.mark.parametrize("net", ["bitonic", "odd_even"])
@pytest.mark.parametrize("n", [4, 7, 49])
def test_hard_limit_is_argsort_permutation(net: str, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.stack([torch.linspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
                     for _ in range(3)])
    y, P = soft_sort(x, 1e6, net)
    ranks = x.argsort(-1).argsort(-1)  # ascending rank of every input
    hard = torch.nn.functional.one_hot(ranks, n).double()  # Pi[i, rank(x_i)] = 1
    assert (P - hard).abs().max() <= 1e-3
    assert torch.equal(P.argmax(-1), ranks)
    assert torch.allclose(y, x.sort(-1).values, atol=1e-3)


def test_network_sizes_and_batch_shapes() -> None:
    N, layers = network("bitonic", 49)
    assert N == 64 and len(layers) == 21
    assert len(network("odd_even", 7)[1]) == 7
    x = torch.randn(2, 3, 7)
    y, P = SoftSort(10.0)(x)
    assert y.shape == (2, 3, 7) and P.shape == (2, 3, 7, 7)


def test_float32_under_autocast() -> None:
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, P = soft_sort(x.bfloat16(), 100.0)
    assert y.dtype == torch.float32 and P.dtype == torch.float32


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="sort_net"):
        SoftSort(net="merge")
    with pytest.raises(ValueError, match="steepness"):
        soft_sort(torch.randn(2, 4), steepness=0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        soft_sort(torch.randn(2, 0))
