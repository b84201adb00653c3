"""Single-object discovery on the key facet of the last block: LOST and TokenCut, batched on the device.

Both methods take the last block's keys of the patch tokens, heads concatenated, CLS and registers removed
(``Backbone.facets(x, block=-1).patches("k")``, shape (B, h, w, D)), build a patch graph, pick a seed patch and
return the 4-connected component of a binary patch map that holds the seed; its grid extent becomes a pixel box.
Images are normalised, zero-padded bottom/right to multiples of the patch size and grouped by padded size, so one
batched ``bmm`` / ``eigh`` serves several images. See docs/eval/discovery.md for the formulas, the defaults and the
differences from the reference code.

- :func:`lost`: A = F Fᵀ; degree d_p = #{q ≠ p : A_pq > 0}; seed = lowest degree (ties: lowest index); among the k
  lowest-degree patches S = {q : A_sq > 0}; map M = Σ_{r ∈ S} A_r·; component of {M > 0} holding the seed.
- :func:`tokencut`: W = [F̂F̂ᵀ > τ] with 0 → ε (F̂ row-normalised); second-smallest eigenvector of the normalised
  Laplacian D^-1/2 (D − W) D^-1/2 (``torch.linalg.eigh``), x = D^-1/2 y, which solves (D − W) x = λ D x; partition
  x > mean(x), seed = argmax |x|, the seed's side; component holding the seed.
- :func:`discover_boxes`: the whole pipeline over a list of images of any sizes. (The third box source of
  ``dinokit discover``, CLS-attention pseudo-boxes, is ``dinokit.data.crops.pseudo_boxes``.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.extract import as_uint8_chw
from .boxes import grid_box_to_xyxy

METHODS = ("lost", "tokencut")
LOST_K = 100
TOKENCUT_TAU = 0.2
TOKENCUT_EPS = 1e-5
COMPONENT_BACKENDS = ("torch", "scipy")


@dataclass
class Discovery:
    """Result of :func:`lost` / :func:`tokencut` for a batch of B images on one (h, w) grid.

    extent: (B, 4) int64 grid extent ``(r0, r1, c0, c1)`` of the component (rows [r0, r1), columns [c0, c1));
    seed: (B,) int64 row-major patch index of the seed; mask: (B, h, w) bool map the component is taken from
    (LOST: M > 0; TokenCut: the seed's side of the bipartition); component: (B, h, w) bool; score: (B, h, w) float
    (LOST: the expansion map M; TokenCut: the eigenvector x with the sign that puts the seed on the positive side);
    seed_outside: (B,) bool, True where the seed was not in ``mask`` (then the component is the seed patch alone);
    extra: method-specific tensors (LOST: ``degree`` (B, N), ``potentials`` (B, k), ``similar`` (B, k) bool;
    TokenCut: ``eigenvalue`` (B,) of the normalised Laplacian).
    """

    extent: torch.Tensor
    seed: torch.Tensor
    mask: torch.Tensor
    component: torch.Tensor
    score: torch.Tensor
    seed_outside: torch.Tensor
    extra: dict = field(default_factory=dict)


def _flat_keys(keys: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    if keys.ndim != 4:
        raise ValueError(f"keys must be (B, h, w, D) patch keys (Facets.patches('k')), got {tuple(keys.shape)}")
    B, h, w, D = keys.shape
    if h * w < 2:
        raise ValueError(f"a {h}x{w} grid has fewer than 2 patches; use larger images")
    return keys.reshape(B, h * w, D).float(), (h, w)


# ------------------------------------------------------------------------------------------- components


def seed_component(mask: torch.Tensor, seed: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """The 4-connected component of ``mask`` (B, h, w) bool that holds patch ``seed`` (B,) (row-major index).

    ``torch``: batched flood fill from the seed on the mask's device (4-neighbour dilation intersected with the
    mask until it stops growing, checked every 8 steps). ``scipy``: ``scipy.ndimage.label`` (its default cross
    structure) per image on the CPU. Both give the same component; the seed is counted in the mask (a seed
    outside the mask gives the seed patch alone)."""
    if backend not in COMPONENT_BACKENDS:
        raise ValueError(f"component backend {backend!r}; choose one of {COMPONENT_BACKENDS}")
    B, h, w = mask.shape
    ar = torch.arange(B, device=mask.device)
    m = mask.bool().clone()
    m.view(B, -1)[ar, seed] = True
    if backend == "scipy":
        from scipy import ndimage

        out = np.zeros((B, h, w), bool)
        mm, ss = m.cpu().numpy(), seed.cpu().numpy()
        for b in range(B):
            lab, _ = ndimage.label(mm[b])
            out[b] = lab == lab.reshape(-1)[ss[b]]
        return torch.from_numpy(out).to(mask.device)
    comp = torch.zeros_like(m)
    comp.view(B, -1)[ar, seed] = True
    for step in range(h * w):
        grown = comp.clone()
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        grown[:, :, 1:] |= comp[:, :, :-1]
        grown[:, :, :-1] |= comp[:, :, 1:]
        grown &= m
        if step % 8 == 7 and torch.equal(grown, comp):
            break
        comp = grown
    return comp


def component_extent(component: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool components (each non-empty) -> (B, 4) int64 ``(r0, r1, c0, c1)``, half-open grid extents."""
    B, h, w = component.shape
    rows, cols = component.any(2).to(torch.uint8), component.any(1).to(torch.uint8)
    r0 = rows.argmax(1)  # first maximum = first occupied row
    r1 = h - rows.flip(1).argmax(1)
    c0 = cols.argmax(1)
    c1 = w - cols.flip(1).argmax(1)
    return torch.stack([r0, r1, c0, c1], 1).long()


def extent_to_boxes(extent: torch.Tensor | np.ndarray, patch_size: int,
                    sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(B, 4) grid extents -> (B, 4) float64 pixel boxes ``(x1, y1, x2, y2)``: ``(c0 p, r0 p, c1 p, r1 p)`` with x2/y2
    clipped to each image's unpadded (H, W)."""
    e = np.asarray(extent.cpu() if isinstance(extent, torch.Tensor) else extent, np.int64).reshape(-1, 4)
    if len(e) != len(sizes):
        raise ValueError(f"{len(e)} extents for {len(sizes)} image sizes")
    return np.asarray([grid_box_to_xyxy(int(r0), int(r1), int(c0), int(c1), patch_size, int(H), int(W))
                       for (r0, r1, c0, c1), (H, W) in zip(e, sizes)], np.float64).reshape(-1, 4)


def _finish(mask: torch.Tensor, seed: torch.Tensor, score: torch.Tensor, grid: tuple[int, int], backend: str,
            extra: dict) -> Discovery:
    B = mask.shape[0]
    mask = mask.reshape(B, *grid)
    outside = ~mask.reshape(B, -1)[torch.arange(B, device=mask.device), seed]
    comp = seed_component(mask, seed, backend)
    return Discovery(component_extent(comp), seed, mask, comp, score.reshape(B, *grid), outside, extra)


# ------------------------------------------------------------------------------------------- LOST


@torch.no_grad()
def lost_degree(A: torch.Tensor) -> torch.Tensor:
    """(B, N, N) key similarities -> (B, N) degrees #{q ≠ p : A_pq > 0} (diagonal zeroed, negatives clipped)."""
    diag = A.diagonal(dim1=1, dim2=2) > 0
    return A.gt(0).sum(-1, dtype=torch.int32).long() - diag.long()


@torch.no_grad()
def lost(keys: torch.Tensor, k_patches: int = LOST_K, component_backend: str = "torch") -> Discovery:
    """LOST on (B, h, w, D) patch keys of one grid: seed, expansion to the k lowest-degree patches positively
    correlated with the seed, component of {M > 0} holding the seed (see the module docstring)."""
    if k_patches < 1:
        raise ValueError(f"k_patches={k_patches} must be >= 1 (LOST uses 100)")
    f, grid = _flat_keys(keys)
    B, N, _ = f.shape
    A = f @ f.transpose(1, 2)
    degree = lost_degree(A)
    order = torch.sort(degree, dim=1, stable=True).indices  # ascending degree, ties by patch index
    seed = order[:, 0]
    k = min(k_patches, N)
    potentials = order[:, :k]
    ar = torch.arange(B, device=f.device)
    similar = A[ar, seed].gather(1, potentials) > 0  # (B, k)
    # M = sum of the rows A_r. of the similar potentials: an indicator vector times A
    ind = torch.zeros(B, N, dtype=A.dtype, device=A.device).scatter_(1, potentials, similar.to(A.dtype))
    M = torch.bmm(ind[:, None], A)[:, 0]
    return _finish(M > 0, seed, M, grid, component_backend,
                   {"degree": degree, "potentials": potentials, "similar": similar})


# ------------------------------------------------------------------------------------------- TokenCut


@torch.no_grad()
def tokencut_graph(keys: torch.Tensor, tau: float = TOKENCUT_TAU, eps: float = TOKENCUT_EPS,
                   binary_graph: bool = True, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, N, D) or (B, h, w, D) keys -> (B, N, N) graph W in ``dtype``: cosine similarities of the L2-normalised
    keys, ``binary_graph``: W = [s > τ] with 0 -> ε; else s with s < τ -> ε."""
    f = keys.reshape(keys.shape[0], -1, keys.shape[-1]).float()
    fn = F.normalize(f, p=2, dim=-1)
    s = fn @ fn.transpose(1, 2)
    if binary_graph:
        W = (s > tau).to(dtype)
        return torch.where(W == 0, torch.full_like(W, eps), W)
    W = s.to(dtype)
    return torch.where(W < tau, torch.full_like(W, eps), W)


@torch.no_grad()
def tokencut_eigvec(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-smallest generalised eigenpair of (D − W) x = λ D x for symmetric (B, N, N) graphs with positive
    degrees: ``torch.linalg.eigh`` of D^-1/2 (D − W) D^-1/2, x = D^-1/2 y. Returns (x (B, N) with xᵀ D x = 1,
    λ (B,)); equal to ``scipy.linalg.eigh(D - W, D)``'s second pair up to the sign of x."""
    d = W.sum(-1)
    if bool((d <= 0).any()):
        raise ValueError("TokenCut graph has a node of degree <= 0; use eps > 0")
    dis = d.rsqrt()
    L = (torch.diag_embed(d) - W) * dis[:, :, None] * dis[:, None, :]
    L = 0.5 * (L + L.transpose(1, 2))  # exact symmetry for eigh
    evals, evecs = torch.linalg.eigh(L)
    return evecs[..., 1] * dis, evals[..., 1]


@torch.no_grad()
def tokencut(keys: torch.Tensor, tau: float = TOKENCUT_TAU, eps: float = TOKENCUT_EPS, binary_graph: bool = True,
             eig_dtype: torch.dtype = torch.float64, component_backend: str = "torch") -> Discovery:
    """TokenCut on (B, h, w, D) patch keys of one grid (Normalized Cut bipartition; see the module docstring)."""
    if eps <= 0:
        raise ValueError(f"eps={eps} must be > 0 (TokenCut uses 1e-5): it keeps every degree positive")
    f, grid = _flat_keys(keys)
    B = f.shape[0]
    x, lam = tokencut_eigvec(tokencut_graph(f, tau, eps, binary_graph, eig_dtype))
    part = x > x.mean(1, keepdim=True)
    seed = x.abs().argmax(1)
    ar = torch.arange(B, device=x.device)
    flip = ~part[ar, seed]
    x = torch.where(flip[:, None], -x, x)
    part = torch.where(flip[:, None], ~part, part)
    return _finish(part, seed, x, grid, component_backend, {"eigenvalue": lam})


# ------------------------------------------------------------------------------------------- images -> boxes


@dataclass
class DiscoveryRun:
    """Boxes of :func:`discover_boxes` in the order of the input images.

    boxes: (n, 4) float64 ``(x1, y1, x2, y2)`` pixels of the original images; grids: per image the (h, w) grid;
    seed_outside: indices of images whose seed fell outside the map (their box is the seed patch); components: the
    (h, w) bool component of the first ``keep_maps`` images; scores: their (h, w) float score maps.
    """

    boxes: np.ndarray
    grids: list
    seed_outside: list[int]
    components: list[np.ndarray]
    scores: list[np.ndarray]


def _prepare(image, patch: int, mean: torch.Tensor, std: torch.Tensor, size: str) -> tuple[torch.Tensor, tuple]:
    """uint8 image -> normalised (3, H', W') zero-padded bottom/right to multiples of ``patch``, and the size fed
    before padding."""
    from torchvision.transforms.v2 import functional as TF

    x = as_uint8_chw(image)
    if size != "native":
        if not size.startswith("short:"):
            raise ValueError(f"size={size!r}: expected 'native' (the protocol) or 'short:S'")
        try:
            s = int(size.split(":", 1)[1])
        except ValueError as err:
            raise ValueError(f"size={size!r}: expected 'short:S' with an integer S") from err
        H, W = x.shape[-2:]
        r = s / min(H, W)
        x = TF.resize(x, [max(1, round(H * r)), max(1, round(W * r))], antialias=True)
    H, W = x.shape[-2:]
    x = (x.float() / 255.0 - mean) / std
    ph, pw = math.ceil(H / patch) * patch - H, math.ceil(W / patch) * patch - W
    return F.pad(x, (0, pw, 0, ph)), (H, W)


@torch.no_grad()
def discover_boxes(backbone, images: Sequence, method: str = "lost", batch_size: int = 8,
                   device: str | torch.device | None = None, size: str = "native", k_patches: int = LOST_K,
                   tau: float = TOKENCUT_TAU, eps: float = TOKENCUT_EPS, binary_graph: bool = True,
                   eig_dtype: torch.dtype = torch.float64, component_backend: str = "torch",
                   keep_maps: int = 16) -> DiscoveryRun:
    """One box per image (PIL or uint8 (H, W, 3) arrays of any sizes) by ``lost`` or ``tokencut``.

    Each image is normalised with the backbone's mean/std and zero-padded bottom/right to multiples of p
    (``size="native"``, the protocol; ``"short:S"`` first resizes the shorter side to S); images of equal padded
    size share one batch of at most ``batch_size``; boxes are mapped back to original pixels. Results do not
    depend on the batch composition."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    n = len(images)
    p = backbone.patch_size
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)
    prepared = [_prepare(im, p, mean, std, size) for im in images]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (x, _) in enumerate(prepared):
        buckets.setdefault(tuple(x.shape[-2:]), []).append(i)
    boxes = np.zeros((n, 4), np.float64)
    grids: list = [None] * n
    outside: list[int] = []
    comps: dict[int, np.ndarray] = {}
    scores: dict[int, np.ndarray] = {}
    for idx in buckets.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.stack([prepared[i][0] for i in chunk]).to(device)
            keys = backbone.facets(x, block=-1, which=("k",)).patches("k")
            if method == "lost":
                res = lost(keys, k_patches, component_backend)
            else:
                res = tokencut(keys, tau, eps, binary_graph, eig_dtype, component_backend)
            fed = [prepared[i][1] for i in chunk]
            b = extent_to_boxes(res.extent, p, fed)
            for j, i in enumerate(chunk):
                H0, W0 = as_uint8_chw(images[i]).shape[-2:]
                H1, W1 = fed[j]
                if (H1, W1) != (H0, W0):  # 'short:S': back to original pixels
                    b[j] = np.clip(np.round(b[j] * [W0 / W1, H0 / H1, W0 / W1, H0 / H1]), 0, [W0, H0, W0, H0])
                boxes[i] = b[j]
                grids[i] = tuple(res.mask.shape[-2:])
                if bool(res.seed_outside[j]):
                    outside.append(i)
                if i < keep_maps:
                    comps[i] = res.component[j].cpu().numpy()
                    scores[i] = res.score[j].float().cpu().numpy()
    order = sorted(comps)
    return DiscoveryRun(boxes, grids, sorted(outside), [comps[i] for i in order], [scores[i] for i in order])
