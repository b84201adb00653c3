"""Spatial entropy of cluster assignments (dinokit's definition, version ``se1``; docs/eval/entropy.md).

For M images on one h x w grid (N = hw >= 2 positions) and cluster ids of every token:
n_{k,x} = tokens of cluster k at position x, q_k(x) = n_{k,x} / n_k, Ĥ_k = -Σ_x q_k(x) ln q_k(x) / ln N.
``se`` = Σ_k (n_k / MN) Ĥ_k = 1 - I(C;P)/ln N, ``se_unweighted`` = mean of Ĥ_k over non-empty clusters,
``se_shuffled`` = the same after permuting positions independently within each image (the finite-sample ceiling),
``se_ratio`` = se / se_shuffled, ``nmi_pos`` = 1 - se. 1 = clusters carry no absolute-position information.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

VERSION = "se1"


def _se(labels: np.ndarray, k: int) -> tuple[float, float]:
    m, n = labels.shape
    counts = np.zeros((k, n), dtype=np.float64)
    np.add.at(counts, (labels, np.broadcast_to(np.arange(n), labels.shape)), 1.0)
    nk = counts.sum(1)
    keep = nk > 0
    q = counts[keep] / nk[keep, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(1) / np.log(n)
    return float((nk[keep] / (m * n) * h).sum()), float(h.mean())


def spatial_entropy(labels: torch.Tensor | np.ndarray, num_clusters: int | None = None,
                    shuffle_seed: int = 0) -> dict[str, float]:
    """``se1`` statistics of cluster ids ``labels`` (M, h, w) (or (M, N)); see the module docstring."""
    lab = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if lab.ndim == 3:
        lab = lab.reshape(lab.shape[0], -1)
    if lab.ndim != 2 or lab.shape[0] == 0:
        raise ValueError(f"labels must have shape (M, h, w) or (M, N) with M >= 1, got {lab.shape}")
    if lab.shape[1] < 2:
        raise ValueError(f"spatial entropy needs N >= 2 positions per image, got {lab.shape[1]}")
    if lab.min() < 0:
        raise ValueError("cluster ids must be non-negative")
    k = int(num_clusters if num_clusters is not None else lab.max() + 1)
    if lab.max() >= k:
        raise ValueError(f"cluster id {int(lab.max())} >= num_clusters {k}")
    se, se_u = _se(lab, k)
    rng = np.random.default_rng(shuffle_seed)
    shuffled = np.take_along_axis(lab, rng.permuted(np.broadcast_to(np.arange(lab.shape[1]), lab.shape).copy(),
                                                    axis=1), axis=1)
    se_s, _ = _se(shuffled, k)
    return {"se": se, "se_unweighted": se_u, "se_shuffled": se_s,
            "se_ratio": se / se_s if se_s > 0 else float("nan"), "nmi_pos": 1.0 - se}


def spatial_entropy_of_features(feats: torch.Tensor | np.ndarray, k: int = 100, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                                niter: int = 100, nredo: int = 5, pca_dim: int = 50,
                                backend: str = "faiss") -> dict[str, float]:
    """The default pipeline: standardise, PCA-50, k-means (K = ``k``) per seed, ``se1`` averaged over seeds.

    Args:
        feats: (M, h, w, D) patch tokens on one grid.
    Returns:
        mean over seeds of every statistic of :func:`spatial_entropy` (keys ``se``, ``se_unweighted``, ...).
    """
    from ._inputs import as_features
    from .overcluster import kmeans, project_tokens

    f = as_features(feats)
    m, h, w, _ = f.shape
    if k > m * h * w:
        raise ValueError(f"K={k} exceeds the number of tokens ({m * h * w}); lower k")
    points = project_tokens(f, pca_dim)
    runs = []
    for seed in seeds:
        labels, _ = kmeans(points, k, niter=niter, nredo=nredo, seed=seed, backend=backend)
        runs.append(spatial_entropy(labels.reshape(m, h * w), k))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
