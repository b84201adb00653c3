"""Differentiable sorting networks (bitonic, odd-even) with the Cauchy relaxation, as ``diffsort`` 0.2.0.

``soft_sort(x, steepness)`` returns ``(y, P)`` for ``x`` (M, n): ``y`` (M, n) the softly sorted values (ascending)
and ``P`` (M, n, n) the soft permutation, ``P[m, i, r]`` = share of input ``i`` at rank ``r``, ``y[m] = x[m] @ P[m]``.

Unlike ``diffsort`` (dense products with 0/1 selection matrices, O(n^3) per row and every intermediate matrix kept
for autograd), each layer here updates only the two wires (values and columns of the running matrix) of its
comparators through strided views, and the backward is analytic (see docs/methods/neco.md). Per row and layer it saves
O(n) numbers: the relaxation weight alpha and the difference ``a - b`` of the compared values. The running matrix is
kept only at ``ceil(sqrt(L))``-layer checkpoints and recomputed segment by segment in the backward pass (the X path
is linear for fixed alphas), so memory is O(n^2 sqrt(L)) per row instead of O(n^2 L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

NETWORKS = ("bitonic", "odd_even")
ASC, DESC, IDENT = 0, 1, 2


@dataclass(frozen=True)
class Layer:
    """One layer: wires ``off .. off + 2*m*nblocks`` viewed as (nblocks, 2, m); comparator (blk, j) joins wire
    u = off + 2*m*blk + j and w = u + m. ``mode`` (nblocks, m): 0 ascending (min -> u), 1 descending, 2 identity."""

    off: int
    m: int
    nblocks: int
    mode: tuple[tuple[int, ...], ...]


@lru_cache(maxsize=64)
def network(net: str, n: int) -> tuple[int, tuple[Layer, ...]]:
    """(number of wires N, layers) of the sorting network for n inputs; real input i sits on wire N - n + i."""
    if n < 1:
        raise ValueError(f"cannot sort {n} values; n must be >= 1")
    if net == "bitonic":
        nb = math.ceil(math.log2(n)) if n > 1 else 0
        N = 2 ** nb
        pad = N - n
        layers = []
        for blk in range(nb):
            for lam in range(blk + 1):
                m = 2 ** (blk - lam)
                mode = []
                for a in range(0, N, 2 * m):
                    row = []
                    for j in range(m):
                        u = a + j
                        if u < pad or u + m < pad:
                            row.append(IDENT)  # one or two padding wires: the real wire is unchanged
                        else:
                            row.append(DESC if (u // 2 ** (blk + 1)) % 2 else ASC)
                    mode.append(tuple(row))
                layers.append(Layer(0, m, N // (2 * m), tuple(mode)))
        return N, tuple(layers)
    if net == "odd_even":
        layers = []
        for ell in range(n):
            off = ell % 2
            k = (n - off) // 2
            if k:
                layers.append(Layer(off, 1, k, tuple((ASC,) for _ in range(k))))
        return n, tuple(layers)
    raise ValueError(f"sort_net={net!r}; choose one of {NETWORKS}")


def _pairs(t: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (nblocks, m, …) of the u and w wires of ``layer``; ``t`` has the wires on its first dim."""
    v = t[layer.off: layer.off + 2 * layer.m * layer.nblocks]
    v = v.unflatten(0, (layer.nblocks, 2, layer.m))
    return v[:, 0], v[:, 1]


class _Coeffs:
    """Per-layer constants on a device: sigma (+1 asc, -1 desc, 0 identity) and the identity mask, (nb, m, 1)."""

    def __init__(self, layers: tuple[Layer, ...], device: torch.device, dtype: torch.dtype):
        self.sigma, self.ident = [], []
        for L in layers:
            mode = torch.tensor(L.mode, device=device).unsqueeze(-1)
            self.sigma.append(torch.where(mode == ASC, 1.0, torch.where(mode == DESC, -1.0, 0.0)).to(dtype))
            self.ident.append(mode == IDENT)


def _weights(alpha: torch.Tensor, sigma: torch.Tensor, ident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c1, c2) with new_u = c1 a + c2 b, new_w = c2 a + c1 b (ascending c1 = alpha; descending c1 = 1 - alpha)."""
    om = 1 - alpha
    desc = sigma < 0
    c1 = torch.where(desc, om, alpha).masked_fill_(ident, 1.0)
    c2 = torch.where(desc, alpha, om).masked_fill_(ident, 0.0)
    return c1, c2


def _mix_(t: torch.Tensor, layer: Layer, c2: torch.Tensor) -> torch.Tensor:
    """In place on the wires of ``layer``: (u, w) <- (u - c2 (u - w), w + c2 (u - w)); returns u - w (before).

    ``t``: (N, M, n) running matrix (wires first); ``c2`` (nb, m, M, 1) the weight of the other wire
    (0 for identity comparators, which are then exact no-ops)."""
    u, w = _pairs(t, layer)
    diff = u - w
    u.addcmul_(c2, diff, value=-1.0)
    w.addcmul_(c2, diff)
    return diff


def _identity(n: int, N: int, M: int, like: torch.Tensor) -> torch.Tensor:
    """(N, M, n) running matrix at the start: real wire N - n + i holds input i."""
    X = like.new_zeros(N, M, n)
    X[N - n:] = torch.eye(n, dtype=like.dtype, device=like.device).unsqueeze(1)
    return X


class _SoftSortFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, steepness: float, net: str, segment: int):
        M, n = x.shape
        N, layers = network(net, n)
        co = _Coeffs(layers, x.device, x.dtype)
        v = x.new_zeros(N, M)
        v[N - n:] = x.t()
        alphas, diffs = [], []
        for i, L in enumerate(layers):  # the values path decides every alpha
            a, b = _pairs(v, L)
            d = a - b
            alpha = torch.atan(steepness * (b - a)) / math.pi + 0.5
            c1, c2 = _weights(alpha, co.sigma[i], co.ident[i])
            alphas.append(alpha)
            diffs.append(d)
            na, nb = c1 * a + c2 * b, c2 * a + c1 * b
            a.copy_(na)
            b.copy_(nb)
        X = _identity(n, N, M, x)
        checkpoints = []
        keep = ctx.needs_input_grad[0]  # no checkpoints when nothing will be back-propagated (teacher)
        for i, L in enumerate(layers):  # the running matrix, linear for fixed alphas
            if keep and i % segment == 0 and i:
                checkpoints.append(X.clone())
            _, c2 = _weights(alphas[i], co.sigma[i], co.ident[i])
            _mix_(X, L, c2.unsqueeze(-1))
        if keep:
            ctx.save_for_backward(*alphas, *diffs, *checkpoints)
        ctx.meta = (steepness, net, segment, n, N, len(layers))
        return v[N - n:].t().contiguous(), X[N - n:].permute(1, 2, 0).contiguous()  # frees the padding wires

    @staticmethod
    def backward(ctx, gy: torch.Tensor | None, gP: torch.Tensor | None):
        steepness, net, segment, n, N, nl = ctx.meta
        _, layers = network(net, n)
        saved = ctx.saved_tensors
        alphas, diffs, cks = saved[:nl], saved[nl:2 * nl], saved[2 * nl:]
        ref = alphas[0]
        M = ref.shape[-1]
        co = _Coeffs(layers, ref.device, ref.dtype)
        gv = ref.new_zeros(N, M)
        if gy is not None:
            gv[N - n:] = gy.t()
        G = None
        if gP is not None:
            G = ref.new_zeros(N, M, n)
            G[N - n:] = gP.permute(2, 0, 1)
        starts = list(range(0, nl, segment))
        for s_idx in reversed(range(len(starts))):
            s, e = starts[s_idx], min(starts[s_idx] + segment, nl)
            xdiff = []
            if G is not None:  # recompute the running matrix through this segment, keep X_u - X_w per layer
                X = _identity(n, N, M, ref) if s == 0 else cks[s_idx - 1].clone()
                for i in range(s, e):
                    if i + 1 < e:
                        _, c2 = _weights(alphas[i], co.sigma[i], co.ident[i])
                        xdiff.append(_mix_(X, layers[i], c2.unsqueeze(-1)))
                    else:
                        u, w = _pairs(X, layers[i])
                        xdiff.append(u - w)
                del X
            for i in reversed(range(s, e)):
                L, alpha, d, sig = layers[i], alphas[i], diffs[i], co.sigma[i]
                c1, c2 = _weights(alpha, sig, co.ident[i])
                gu, gw = _pairs(gv, L)
                abar = (gu - gw) * d
                if G is not None:
                    gdiff = _mix_(G, L, c2.unsqueeze(-1))  # the transposed mix is the same mix
                    abar = abar + torch.linalg.vecdot(gdiff, xdiff[i - s])
                abar = abar * sig
                beta = steepness / (math.pi * (1 + (steepness * d) ** 2))
                ga = c1 * gu + c2 * gw - beta * abar
                gb = c2 * gu + c1 * gw + beta * abar
                gu.copy_(ga)
                gw.copy_(gb)
        return gv[N - n:].t(), None, None, None


def soft_sort(x: torch.Tensor, steepness: float = 100.0, net: str = "bitonic",
              segment: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft sort the last dim of ``x`` (…, n) ascending: ``(y (…, n), P (…, n, n))``.

    Runs in float32 (float64 inputs stay float64) with autocast disabled. ``segment``: layers between checkpoints
    of the running matrix (default ceil(sqrt(layers))).
    """
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"soft_sort needs inputs (..., n) with n >= 1, got shape {tuple(x.shape)}")
    if not math.isfinite(steepness) or steepness <= 0:
        raise ValueError(f"steepness must be a positive finite number, got {steepness}")
    n = x.shape[-1]
    _, layers = network(net, n)
    seg = segment or max(1, math.ceil(math.sqrt(max(1, len(layers)))))
    lead = x.shape[:-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = x.reshape(-1, n).to(dtype)
        if not layers:
            y, P = flat.clone(), torch.ones(flat.shape[0], n, n, dtype=dtype, device=x.device)
        else:
            y, P = _SoftSortFn.apply(flat, float(steepness), net, seg)
    return y.reshape(*lead, n), P.reshape(*lead, n, n)


class SoftSort(nn.Module):
    """Differentiable sorting network (``bitonic`` or ``odd_even``, Cauchy relaxation) over the last dim."""

    def __init__(self, steepness: float = 100.0, net: str = "bitonic"):
        super().__init__()
        if net not in NETWORKS:
            raise ValueError(f"sort_net={net!r}; choose one of {NETWORKS}")
        self.steepness, self.net = float(steepness), net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (…, n) -> (y (…, n) ascending soft-sorted values, P (…, n, n) soft permutation)."""
        return soft_sort(x, self.steepness, self.net)

    def extra_repr(self) -> str:
        return f"steepness={self.steepness}, net={self.net!r}"
