"""Overclustering (k-means segmentation) evaluation: standardise, PCA-50, k-means for several K and seeds.

Spec: docs/eval/index.md Only the evaluation split is clustered. Protocols:

- ``fast100`` (Leopart/NeCo): points are tokens; the token cluster map and the masks are torch-nearest resized to
  100x100; K = C uses Hungarian matching, other K many-to-one (precision).
- ``full``: as ``fast100`` but the token map is torch-nearest resized to each mask's own (H_i, W_i).

PCA is exact on all points: first and second moments accumulated over chunks in fp64 (per-chunk products in fp32,
see :class:`FeatureMoments`), standardisation and the top eigenvectors derived in closed form (fp64 eigh). k-means is
faiss ``Kmeans`` (defaults: max 256 points per centroid, random init, ``nredo`` keeps the lowest objective);
``backend="torch"`` runs the same algorithm in torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ._inputs import MaskLike, as_features, as_masks, check_labels, torch_nearest
from .metrics import ConfusionMatrix, match_and_score

PROTOCOLS = ("fast100", "full")


class FeatureMoments:
    """Streaming first and second moments of points (N, D), for standardisation and exact PCA.

    Points are shifted by the first chunk's mean (numerical stability); each chunk's sums and Gram matrix are
    computed in ``chunk_dtype`` (fp32 by default: 8,192-row BLAS products, relative error ~1e-6) and accumulated
    over chunks in fp64. ``chunk_dtype=torch.float64`` computes everything in fp64 (about 2-3x slower).
    """

    def __init__(self, dim: int, chunk_dtype: torch.dtype = torch.float32):
        self.dim, self.n, self.chunk_dtype = dim, 0, chunk_dtype
        self.shift: torch.Tensor | None = None  # first chunk's mean, subtracted for numerical stability
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor, chunk: int = 8192) -> FeatureMoments:
        """Add points ``x`` (N, D)."""
        x = x.reshape(-1, self.dim)
        for i in range(0, x.shape[0], chunk):
            c = x[i:i + chunk]
            if self.shift is None:
                self.shift = c.double().mean(0)
            c = c.to(self.chunk_dtype) - self.shift.to(self.chunk_dtype)
            self.sum += c.sum(0, dtype=torch.float64)
            self.gram += (c.T @ c).double()
            self.n += c.shape[0]
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D,) mean and (D, D) population covariance, fp64."""
        if self.n == 0 or self.shift is None:
            raise ValueError("no points were accumulated (empty split?)")
        m = self.sum / self.n
        cov = self.gram / self.n - torch.outer(m, m)
        return m + self.shift, cov


@dataclass
class PCAProjection:
    """z = ((x - mean) / scale) @ components; components (D, d) are the top-d eigenvectors of cov(z)."""

    mean: torch.Tensor
    scale: torch.Tensor
    components: torch.Tensor
    explained: torch.Tensor = field(repr=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, d) fp32 projected points (fp32 arithmetic; the statistics themselves are fp64)."""
        z = (x.float() - self.mean.float()) / self.scale.float()
        return z @ self.components.float()


def fit_standardised_pca(moments: FeatureMoments, dim: int = 50, std_eps: float = 0.0) -> PCAProjection:
    """Standardise per dimension ((x - mu)/sigma, population sigma; sigma = 0 -> 1, or sigma + ``std_eps`` when
    ``std_eps`` > 0) and fit a ``dim``-component PCA (no whitening) from the accumulated moments."""
    mean, cov = moments.mean_cov()
    sigma = cov.diagonal().clamp_min(0).sqrt()
    scale = sigma + std_eps if std_eps > 0 else torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    cov_z = cov / torch.outer(scale, scale)
    evals, evecs = torch.linalg.eigh(cov_z)
    d = min(dim, cov_z.shape[0])
    order = torch.argsort(evals, descending=True)[:d]
    return PCAProjection(mean, scale, evecs[:, order].contiguous(), evals[order])


@contextmanager
def faiss_threads(work: float, small: float = 2e7):
    """Run faiss single-threaded for small problems (``work`` ~ points x centroids): OpenMP start-up and
    spinning dominate there, badly so on shared CPUs. Restores the previous thread count."""
    import faiss

    before = faiss.omp_get_max_threads()
    if work < small:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def kmeans(points: torch.Tensor | np.ndarray, k: int, niter: int = 100, nredo: int = 5, seed: int = 0,
           backend: str = "faiss", max_points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """k-means of (N, d) points -> (labels (N,) int64, centroids (k, d) float32).

    ``faiss``: ``faiss.Kmeans(d, k, niter, nredo, seed, spherical=False)`` then nearest centroid (L2) for every
    point. ``torch``: the same algorithm (random subset of k·256 points, random initial centroids, Lloyd, best of
    ``nredo``) with a torch RNG; same protocol, not bit-identical to faiss.
    """
    x = np.ascontiguousarray(points.numpy() if isinstance(points, torch.Tensor) else points, dtype=np.float32)
    n, d = x.shape
    if k > n:
        raise ValueError(f"K={k} is larger than the number of points ({n}); use K <= {n} or evaluate more images")
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    if backend == "faiss":
        import faiss

        with faiss_threads(n * k):
            km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=False, verbose=False,
                              max_points_per_centroid=max_points_per_centroid)
            km.train(x)
            _, idx = km.index.search(x, 1)
        return idx[:, 0].astype(np.int64), km.centroids.copy()
    if backend == "torch":
        return _torch_kmeans(torch.from_numpy(x), k, niter, nredo, seed, max_points_per_centroid)
    raise ValueError(f"unknown kmeans backend {backend!r}; choose 'faiss' or 'torch'")


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    labels, dists = [], []
    cn = (c * c).sum(1)
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        dd = (xi * xi).sum(1, keepdim=True) - 2 * xi @ c.T + cn
        v, j = dd.min(1)
        labels.append(j)
        dists.append(v.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def _torch_kmeans(x: torch.Tensor, k: int, niter: int, nredo: int, seed: int,
                  max_ppc: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    train = x[torch.randperm(n, generator=g)[:k * max_ppc]] if n > k * max_ppc else x
    best, best_obj = None, float("inf")
    for _ in range(max(1, nredo)):
        c = train[torch.randperm(train.shape[0], generator=g)[:k]].clone()
        for _ in range(niter):
            lab, _ = _assign(train, c)
            sums = torch.zeros_like(c).index_add_(0, lab, train)
            cnt = torch.bincount(lab, minlength=k).to(c.dtype)
            nonempty = cnt > 0
            c[nonempty] = sums[nonempty] / cnt[nonempty, None]
        obj = float(_assign(train, c)[1].sum())
        if obj < best_obj:
            best, best_obj = c, obj
    assert best is not None
    labels, _ = _assign(x, best)
    return labels.numpy().astype(np.int64), best.numpy()


@dataclass
class OverclusterResult:
    """``metrics``: flat dict with keys ``k{K}/miou``, ``k{K}/miou_std``, ``k{K}/s{seed}/miou``, ``k{K}/pixel_acc``,
    ``k{K}/bg_frac`` (many-to-one only); ``cluster_maps``: K -> (B, h, w) int64 token clusters of the first seed;
    ``confusion``: K -> (C, K) confusion matrix of the first seed."""

    metrics: dict[str, float]
    cluster_maps: dict[int, np.ndarray]
    confusion: dict[int, np.ndarray]


def project_tokens(feats: torch.Tensor, pca_dim: int = 50, std_eps: float = 0.0) -> torch.Tensor:
    """Standardise and PCA-project (B, h, w, D) tokens -> (B·h·w, pca_dim) fp32 points."""
    flat = feats.reshape(-1, feats.shape[-1])
    pca = fit_standardised_pca(FeatureMoments(flat.shape[1]).update(flat), pca_dim, std_eps)
    out = torch.empty(flat.shape[0], pca.components.shape[1])
    for i in range(0, flat.shape[0], 65536):
        out[i:i + 65536] = pca(flat[i:i + 65536])
    return out


def overcluster(feats: torch.Tensor | np.ndarray, masks: MaskLike, num_classes: int,
                ks: Sequence[int] | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4), protocol: str = "fast100",
                ignore_index: int | None = 255, niter: int = 100, nredo: int = 5, pca_dim: int = 50,
                eval_size: int = 100, backend: str = "faiss", absent: str = "zero",
                matching: str | None = None, batch_size: int = 64) -> OverclusterResult:
    """Overclustering mIoU of patch features against masks.

    Args:
        feats: (B, h, w, D) patch tokens of the evaluation split (torch or numpy; upcast to fp32).
        masks: (B, H, W) int masks, or a list of (H_i, W_i) masks for ``full``; ``ignore_index`` pixels skipped.
        num_classes: number of ground-truth classes C.
        ks: list of K (default ``[C, 100, 300, 500]`` restricted to K <= number of tokens).
        seeds: k-means seeds; the mean and std over seeds are reported.
        protocol: ``fast100`` (maps at ``eval_size``²) or ``full`` (token map resized to each mask).
        matching: override the matching (default: ``hungarian`` for K = C, ``many_to_one`` precision otherwise).
    Returns:
        :class:`OverclusterResult`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown overcluster protocol {protocol!r}; choose one of {PROTOCOLS}")
    f = as_features(feats)
    b, h, w, _ = f.shape
    m = as_masks(masks, b)
    if protocol == "fast100":
        m = torch.stack([torch_nearest(x, (eval_size, eval_size)) for x in m]) if isinstance(m, list) else \
            torch_nearest(m, (eval_size, eval_size))
    check_labels(m, num_classes, ignore_index)
    n_tokens = b * h * w
    if ks is None:
        ks = [k for k in (num_classes, 100, 300, 500) if k <= n_tokens]
    too_big = [k for k in ks if k > n_tokens]
    if too_big:
        raise ValueError(f"K={too_big} exceeds the number of tokens ({b} images x {h}x{w} = {n_tokens}); "
                         "lower K or evaluate more images")
    points = project_tokens(f, pca_dim)
    metrics: dict[str, float] = {}
    maps: dict[int, np.ndarray] = {}
    confs: dict[int, np.ndarray] = {}
    for k in ks:
        match = matching or ("hungarian" if k == num_classes else "many_to_one")
        per_seed = []
        for si, seed in enumerate(seeds):
            labels, _ = kmeans(points, k, niter=niter, nredo=nredo, seed=seed, backend=backend)
            cmap = torch.from_numpy(labels).view(b, h, w)
            cm = ConfusionMatrix(num_classes, k, ignore_index)
            for i in range(0, b, batch_size):
                if isinstance(m, torch.Tensor):
                    cm.update(m[i:i + batch_size], torch_nearest(cmap[i:i + batch_size], tuple(m.shape[-2:])))
                else:
                    for j in range(i, min(b, i + batch_size)):
                        cm.update(m[j], torch_nearest(cmap[j], tuple(m[j].shape[-2:])))
            s = match_and_score(cm.numpy(), matching=match, absent=absent)
            per_seed.append(s)
            metrics[f"k{k}/s{seed}/miou"] = s["miou"]
            if si == 0:
                maps[k], confs[k] = cmap.numpy(), cm.numpy()
        metrics[f"k{k}/miou"] = float(np.mean([s["miou"] for s in per_seed]))
        metrics[f"k{k}/miou_std"] = float(np.std([s["miou"] for s in per_seed]))
        metrics[f"k{k}/pixel_acc"] = float(np.mean([s["pixel_acc"] for s in per_seed]))
        if match == "many_to_one":
            metrics[f"k{k}/bg_frac"] = float(np.mean([s["bg_frac"] for s in per_seed]))
    return OverclusterResult(metrics, maps, confs)


def _all_reduce_moments(m: FeatureMoments) -> FeatureMoments:
    """Moments of all ranks' points, re-centred on the global mean (every rank gets the same, also W = 1).

    Raw sums about 0 (S = sum + n·shift, G = gram + shift·sumᵀ + sum·shiftᵀ + n·shift·shiftᵀ, fp64) are summed
    over ranks, then re-expressed about the global mean; one process takes the same path, so W processes and one
    agree to fp64 rounding."""
    import torch.distributed as dist

    shift = m.shift if m.shift is not None else torch.zeros(m.dim, dtype=torch.float64)
    s0 = m.sum + m.n * shift
    g0 = m.gram + torch.outer(shift, m.sum) + torch.outer(m.sum, shift) + m.n * torch.outer(shift, shift)
    n = torch.tensor([float(m.n)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        for t in (s0, g0, n):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    out = FeatureMoments(m.dim, m.chunk_dtype)
    out.n = int(n.item())
    if out.n == 0:
        return out
    mu = s0 / out.n
    out.shift, out.sum = mu, torch.zeros_like(mu)
    out.gram = g0 - out.n * torch.outer(mu, mu)
    return out


class _AppendFile:
    """Rows of a fixed dtype appended to a raw file; read back with ``np.memmap`` (nothing kept in RAM)."""

    def __init__(self, path, dtype):
        from pathlib import Path

        self.path, self.dtype, self.count = Path(path), np.dtype(dtype), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed in view())

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self._fh.write(a.tobytes())
        self.count += a.size

    def view(self) -> np.ndarray:
        if not self._fh.closed:
            self._fh.close()
        if self.count == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))


class OverclusterStream:
    """Streaming overclustering: ``add`` one batch of features and masks at a time, ``compute`` at the end.

    Per batch the (B, h, w, D) tokens go to a raw fp32 file under ``workdir`` and into the fp64 moment
    accumulator; masks go to a second file (their dtype, any (H_i, W_i)). ``compute`` all-reduces the moments
    (DDP), fits the standardised PCA, projects every token (chunks read from disk) into a memmap of ``pca_dim``
    points, gathers the points and masks of all ranks once (in dataset order) and runs k-means + matching on
    rank 0. RAM holds one batch plus the projected points that k-means needs (N·h·w·pca_dim fp32).
    ``protocol="fast100"`` resizes masks to ``eval_size``² (torch nearest) as they arrive.
    """

    def __init__(self, workdir, num_classes: int, protocol: str = "fast100", ignore_index: int | None = 255,
                 eval_size: int = 100, pca_dim: int = 50, std_eps: float = 0.0):
        from pathlib import Path

        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown overcluster protocol {protocol!r}; choose one of {PROTOCOLS}")
        self.workdir = Path(workdir)
        self.num_classes, self.protocol, self.ignore_index = num_classes, protocol, ignore_index
        self.eval_size, self.pca_dim, self.std_eps = eval_size, pca_dim, std_eps
        self.moments: FeatureMoments | None = None
        self.grid: tuple[int, int] | None = None
        self.index: list[int] = []
        self.mask_shapes: list[tuple[int, int]] = []
        self._feats: _AppendFile | None = None
        self._masks: _AppendFile | None = None

    def add(self, feats: torch.Tensor, masks: MaskLike, index: Sequence[int]) -> None:
        """feats (B, h, w, D); masks (B, H, W) or B maps (H_i, W_i), integer; index (B,) dataset positions."""
        f = as_features(feats)
        b, h, w, d = f.shape
        m = as_masks(masks, b)
        items = list(m) if isinstance(m, torch.Tensor) else m
        if self.protocol == "fast100":
            items = [torch_nearest(x, (self.eval_size, self.eval_size)) for x in items]
        check_labels(items, self.num_classes, self.ignore_index)
        if self.moments is None:
            self.moments, self.grid = FeatureMoments(d), (h, w)
            self._feats = _AppendFile(self.workdir / "tokens.f32", np.float32)
            self._masks = _AppendFile(self.workdir / "masks.i32", np.int32)
        if (h, w) != self.grid:
            raise ValueError(f"feature grid {(h, w)} differs from the first batch's {self.grid}; use one --size")
        self.moments.update(f.reshape(-1, d))
        self._feats.append(f.numpy())
        for x in items:
            self._masks.append(x.numpy())
            self.mask_shapes.append(tuple(x.shape[-2:]))
        self.index += [int(i) for i in index]

    def _project(self, pca: PCAProjection, chunk: int = 65536) -> np.ndarray:
        n_tok = len(self.index) * self.grid[0] * self.grid[1] if self.grid else 0
        out = np.lib.format.open_memmap(self.workdir / "points.npy", mode="w+", dtype=np.float32,
                                        shape=(n_tok, pca.components.shape[1]))
        if n_tok:
            d = self.moments.dim
            src = self._feats.view().reshape(n_tok, d)
            for i in range(0, n_tok, chunk):
                out[i:i + chunk] = pca(torch.from_numpy(np.asarray(src[i:i + chunk]))).numpy()
            out.flush()
        return out

    def _gathered(self, points: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray] | None:
        """(points (N·h·w, d), masks in dataset order, index order) on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        mflat = self._masks.view() if self._masks is not None else np.zeros(0, np.int32)
        offs = np.cumsum([0] + [a * b for a, b in self.mask_shapes])
        masks = [np.asarray(mflat[offs[j]:offs[j + 1]]).reshape(s) for j, s in enumerate(self.mask_shapes)]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            order = np.argsort(np.asarray(self.index), kind="stable")
            tok = self.grid[0] * self.grid[1]
            pts = np.asarray(points).reshape(len(self.index), tok, -1)[order].reshape(-1, points.shape[1])
            return pts, [masks[j] for j in order], np.asarray(self.index)[order]
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((self.index, np.asarray(points), masks), parts, dst=0)
        if dist.get_rank() != 0:
            return None
        index = [i for p in parts for i in p[0]]
        all_masks = [x for p in parts for x in p[2]]
        tok = self.grid[0] * self.grid[1]
        pts = np.concatenate([p[1].reshape(len(p[0]), tok, -1) for p in parts if len(p[0])])
        order = np.argsort(np.asarray(index), kind="stable")
        return pts[order].reshape(-1, pts.shape[-1]), [all_masks[j] for j in order], np.asarray(index)[order]

    def compute(self, ks: Sequence[int] | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4), niter: int = 100,
                nredo: int = 5, backend: str = "faiss", absent: str = "zero", matching: str | None = None,
                n_maps: int = 8) -> OverclusterResult | None:
        """k-means for every K and seed; :class:`OverclusterResult` on rank 0 (``cluster_maps`` of the first
        ``n_maps`` images), None on the other ranks. Every rank must call it (collectives)."""
        if self.moments is None:  # this rank saw no image: contribute empty statistics
            raise ValueError("overclustering got no images (empty split or shard); evaluate more images")
        moments = _all_reduce_moments(self.moments)
        pca = fit_standardised_pca(moments, self.pca_dim, self.std_eps)
        got = self._gathered(self._project(pca))
        if got is None:
            return None
        points, masks, _ = got
        h, w = self.grid
        b = len(masks)
        n_tokens = b * h * w
        if ks is None:
            ks = [k for k in (self.num_classes, 100, 300, 500) if k <= n_tokens]
        too_big = [k for k in ks if k > n_tokens]
        if too_big:
            raise ValueError(f"K={too_big} exceeds the number of tokens ({b} images x {h}x{w} = {n_tokens}); "
                             "lower K or evaluate more images")
        metrics: dict[str, float] = {}
        maps: dict[int, np.ndarray] = {}
        confs: dict[int, np.ndarray] = {}
        for k in ks:
            match = matching or ("hungarian" if k == self.num_classes else "many_to_one")
            per_seed = []
            for si, seed in enumerate(seeds):
                labels, _ = kmeans(points, k, niter=niter, nredo=nredo, seed=seed, backend=backend)
                cmap = torch.from_numpy(labels).view(b, h, w)
                cm = ConfusionMatrix(self.num_classes, k, self.ignore_index)
                for j in range(b):
                    mj = torch.from_numpy(masks[j].astype(np.int64))
                    cm.update(mj, torch_nearest(cmap[j], tuple(mj.shape)))
                s = match_and_score(cm.numpy(), matching=match, absent=absent)
                per_seed.append(s)
                metrics[f"k{k}/s{seed}/miou"] = s["miou"]
                if si == 0:
                    maps[k], confs[k] = cmap[:n_maps].numpy(), cm.numpy()
            metrics[f"k{k}/miou"] = float(np.mean([s["miou"] for s in per_seed]))
            metrics[f"k{k}/miou_std"] = float(np.std([s["miou"] for s in per_seed]))
            metrics[f"k{k}/pixel_acc"] = float(np.mean([s["pixel_acc"] for s in per_seed]))
            if match == "many_to_one":
                metrics[f"k{k}/bg_frac"] = float(np.mean([s["bg_frac"] for s in per_seed]))
        return OverclusterResult(metrics, maps, confs)
