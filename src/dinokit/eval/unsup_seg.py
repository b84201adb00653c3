"""Fully unsupervised semantic segmentation, protocol ``cbfe-cd``: cluster-based foreground extraction (CBFE) and
community detection (CD) over cluster co-occurrences, scored with Hungarian matching. See docs/eval/unsup_seg.md.

Pipeline (train and val splits together; maps at ``eval_size``² = 100² by default):

1. tokens of both splits are standardised ((x − μ)/(σ + 1e-5)) and projected to 50 dims by one PCA;
2. noisy foreground masks come from the CLS attention (:func:`noisy_foreground`) or are given;
3. CBFE: spherical k-means (K_fg = 200) of all tokens; per cluster the mean over the images containing it of
   precision(noisy fg | cluster) (:func:`cluster_precision`); on train the cut of the sorted clusters that sends
   55–75 % of them to background with the best per-image foreground Jaccard against the labels (gt ≠ 0; 255 counts
   as foreground) gives one threshold, rounded to the nearest 0.05 (:func:`cbfe_threshold`); each split keeps the
   clusters whose own precision reaches it (this uses train labels for one scalar, as the reference);
4. PCA features nearest-upsampled to 100², CBFE-foreground pixels only, k-means with ``k_community`` clusters
   (background = id ``k_community``); the CBFE score clusters the foreground into C − 1 instead (seeds 0–4);
5. CD: grey-level co-occurrence of the cluster maps (:func:`cooccurrence`), an undirected graph of the cluster pairs
   whose two directed weights reach ``weight_threshold`` (:func:`graph_edges`), Infomap communities for 10 seeds
   (:func:`infomap_partition`), clusters merged by community and scored by Hungarian matching on val;
6. hyper-parameters given or searched with Optuna TPE on train mIoU (:func:`search_hyperparameters`).

The upsampled points (VOC: 2,913 × 10⁴ × 50 fp32 ≈ 5.8 GB) never sit in RAM: only foreground points are written to a
``np.memmap`` in a temporary folder and read by faiss and the assignment in chunks. ``infomap``, ``scikit-image`` and
``optuna`` come with the ``dinokit[unsup]`` extra and are imported on first use.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._inputs import torch_nearest
from .metrics import ConfusionMatrix, match_and_score
from .overcluster import FeatureMoments, faiss_threads, fit_standardised_pca

# the reference's eight co-occurrence angles (4π/3 where the 8-neighbourhood would have 5π/4; kept as published)
ANGLES: tuple[float, ...] = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi, 4 * math.pi / 3,
                             3 * math.pi / 2, 7 * math.pi / 4)
DISTANCES: tuple[int, ...] = (1, 2)
PUBLISHED_HP = {  # (k_community, markov_time, weight_threshold) of the published runs
    "leopart_vits16": (149, 2.0, 0.09), "leopart_vitb8": (109, 0.4, 0.07),
    "neco_vits14": (189, 1.2, 0.07), "neco_vitb14": (149, 1.7, 0.07),
}


def require(module: str):
    """Import an optional dependency of this protocol, or raise naming the ``dinokit[unsup]`` extra."""
    import importlib

    pip = {"infomap": "infomap", "skimage": "scikit-image", "optuna": "optuna"}.get(module, module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"the unsupervised segmentation protocol needs {pip!r}: pip install 'dinokit[unsup]' "
                          f"(or pip install {pip})") from err


# ------------------------------------------------------------------------------------------- noisy foreground


def mass_mask(m: torch.Tensor, mass: float) -> torch.Tensor:
    """(B, h, w) non-negative maps -> (B, h, w) bool: the reference's rule, sort ascending (stable), normalise,
    keep the cells whose cumulative mass exceeds 1 − ``mass`` (= the fewest largest cells holding ``mass``)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    B = m.shape[0]
    val, idx = torch.sort(m.reshape(B, -1).double(), dim=1, stable=True)
    val = val / val.sum(1, keepdim=True).clamp_min(1e-300)
    keep = val.cumsum(1) > 1.0 - mass
    return torch.zeros_like(keep).scatter_(1, idx, keep).reshape(m.shape)


def noisy_foreground(attn: torch.Tensor, mass: float = 0.65, kernel: int = 7, sigma: float = 0.6,
                     min_component: int = 3) -> torch.Tensor:
    """(B, heads, h, w) CLS→patch attention -> (B, h, w) bool noisy foreground masks.

    Heads averaged, Gaussian blur (``kernel``, ``sigma``, reflect padding), the fewest patches holding ``mass`` of
    the blurred map (:func:`mass_mask`), then 8-connected components of fewer than ``min_component`` patches
    removed."""
    from scipy import ndimage
    from torchvision.transforms.functional import gaussian_blur

    if attn.ndim != 4:
        raise ValueError(f"attention must be (B, heads, h, w), got {tuple(attn.shape)}")
    B, _, h, w = attn.shape
    if min(h, w) <= kernel // 2:
        raise ValueError(f"a {h}x{w} attention grid is too small for a {kernel}x{kernel} blur; use larger inputs")
    a = gaussian_blur(attn.float().mean(1, keepdim=True).cpu(), [kernel, kernel], [sigma, sigma])[:, 0]
    keep = mass_mask(a, mass).numpy()
    for b in range(B):
        lab, n = ndimage.label(keep[b], structure=np.ones((3, 3), bool))
        if n:
            small = np.bincount(lab.ravel())[1:] < min_component
            keep[b][np.isin(lab, np.nonzero(small)[0] + 1)] = False
    return torch.from_numpy(keep)


# ------------------------------------------------------------------------------------------- CBFE


def cluster_counts(cluster_maps: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) int cluster maps -> (B, k) float64 pixel counts per image and cluster (``weights``: (B, H, W)
    bool/float, count only those pixels)."""
    B = cluster_maps.shape[0]
    idx = (torch.arange(B)[:, None] * k + cluster_maps.reshape(B, -1).long()).reshape(-1)
    wt = None if weights is None else weights.reshape(-1).double()
    return torch.bincount(idx, weights=wt, minlength=B * k).double().view(B, k)


def cluster_precision(counts: torch.Tensor, fg_counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster the mean, over the images containing it, of precision(fg | cluster) = fg pixels / pixels.

    ``counts``, ``fg_counts``: (B, k) from :func:`cluster_counts`. Returns (precision (k,), number of images
    containing each cluster (k,)); a cluster present in no image gets precision 0."""
    present = counts > 0
    prec = torch.where(present, fg_counts / counts.clamp_min(1), torch.zeros_like(counts))
    occ = present.sum(0)
    return (prec.sum(0) / occ.clamp_min(1)).numpy(), occ.numpy()


def foreground_jaccard(gt_fg: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over images of |gt ∩ pred| / |gt ∪ pred| for (B, H, W) bool masks (an image with both empty counts 1)."""
    g, p = gt_fg.reshape(gt_fg.shape[0], -1).bool(), pred.reshape(pred.shape[0], -1).bool()
    inter, union = (g & p).sum(1).double(), (g | p).sum(1).double()
    return float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())


@dataclass
class CBFECut:
    """The train cut of :func:`cbfe_threshold`: ``start`` clusters (in ascending precision) go to background;
    ``threshold`` is that cluster's precision rounded to the nearest 0.05; ``jaccards`` maps every tried start
    to its mean foreground Jaccard on train."""

    start: int
    threshold: float
    precision_at_cut: float
    jaccards: dict[int, float]


def cbfe_threshold(precision: np.ndarray, counts: torch.Tensor, gt_fg_counts: torch.Tensor,
                   gt_fg_pixels: torch.Tensor, lo: float = 0.55, hi: float = 0.75, step: float = 0.05) -> CBFECut:
    """Choose the CBFE threshold on train: try the cuts ``start = int(lo k) .. int(hi k) - 1`` of the clusters
    sorted by ascending precision (stable), foreground = the clusters from ``start`` on; keep the best mean
    per-image Jaccard against the gt foreground (ties: the largest start); round its precision to the nearest
    multiple of ``step`` in [0, 1).

    ``counts``, ``gt_fg_counts``: (B, k) pixels of each cluster and its gt-foreground pixels per train image;
    ``gt_fg_pixels``: (B,) gt-foreground pixels per image."""
    k = len(precision)
    starts = list(range(int(lo * k), int(hi * k)))
    if not starts:
        raise ValueError(f"no CBFE cut between {lo:.0%} and {hi:.0%} of {k} clusters; use more clusters (K_fg)")
    order = np.argsort(precision, kind="stable")
    # suffix sums over the sorted clusters: pixels / gt-fg pixels of the clusters order[start:]
    c_suf = counts[:, order].flip(1).cumsum(1).flip(1)
    g_suf = gt_fg_counts[:, order].flip(1).cumsum(1).flip(1)
    jac: dict[int, float] = {}
    for s in starts:
        inter, pred = g_suf[:, s], c_suf[:, s]
        union = gt_fg_pixels.double() + pred - inter
        jac[s] = float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())
    best = max(starts, key=lambda s: (jac[s], s))
    p = float(np.sort(precision, kind="stable")[best])
    grid = np.arange(0, 1, step)
    thr = float(grid[int(np.argmin(np.abs(grid - p)))])
    return CBFECut(best, thr, p, jac)


def cbfe_foreground(cluster_maps: torch.Tensor, precision: np.ndarray, threshold: float) -> torch.Tensor:
    """(B, H, W) bool: pixels of the clusters whose precision reaches ``threshold``."""
    keep = torch.from_numpy(np.asarray(precision) >= threshold)
    return keep[cluster_maps.long()]


# ------------------------------------------------------------------------------------------- community detection


def cooccurrence(cluster_maps: Iterable[np.ndarray | torch.Tensor], num_nodes: int,
                 distances: Sequence[int] = DISTANCES, angles: Sequence[float] = ANGLES) -> np.ndarray:
    """(n, n) float64 co-occurrence weights of cluster ids over images.

    Per image: scikit-image ``graycomatrix`` of the (H, W) map (``distances`` × ``angles``, summed), diagonal
    zeroed, rows normalised; summed over images; row i then divided by the number of images in which cluster i
    has at least one co-occurring neighbour (rows that never do stay 0)."""
    feature = require("skimage.feature")
    total = np.zeros((num_nodes, num_nodes), np.float64)
    seen = np.zeros(num_nodes, np.int64)
    dtype = np.uint8 if num_nodes <= 256 else np.uint16
    for m in cluster_maps:
        arr = np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m)
        if arr.size and (arr.min() < 0 or arr.max() >= num_nodes):
            raise ValueError(f"cluster ids [{arr.min()}, {arr.max()}] outside [0, {num_nodes})")
        co = feature.graycomatrix(arr.astype(dtype), distances=list(distances), angles=list(angles),
                                  levels=num_nodes).sum(axis=(2, 3)).astype(np.float64)
        np.fill_diagonal(co, 0)
        rows = co.sum(1)
        total += np.divide(co, rows[:, None], out=np.zeros_like(co), where=rows[:, None] > 0)
        seen += rows > 0
    return np.divide(total, seen[:, None], out=np.zeros_like(total), where=seen[:, None] > 0)


def graph_edges(adj: np.ndarray, weight_threshold: float) -> list[tuple[int, int, float]]:
    """Undirected edges (i, j, w), i <= j, where both adj[i, j] and adj[j, i] reach ``weight_threshold``;
    w = the smaller of the two."""
    a = np.asarray(adj, np.float64)
    ok = (a >= weight_threshold) & (a.T >= weight_threshold)
    i, j = np.nonzero(np.triu(ok))
    return [(int(x), int(y), float(min(a[x, y], a[y, x]))) for x, y in zip(i, j)]


def infomap_partition(edges: Sequence[tuple[int, int, float]], num_nodes: int, markov_time: float = 1.0,
                      seed: int = 1, preferred_modules: int | None = None) -> np.ndarray:
    """Two-level undirected Infomap on weighted ``edges``; returns (num_nodes,) int64 module ids (1, 2, ...), 0 for
    nodes without an edge. ``seed`` must be >= 1 (the infomap package rejects 0)."""
    infomap = require("infomap")
    out = np.zeros(num_nodes, np.int64)
    if not edges:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infomap 2.16 flags its constructor options as a legacy surface
        im = infomap.Infomap(directed=False, two_level=True, seed=int(seed), markov_time=float(markov_time),
                             silent=True, preferred_number_of_modules=preferred_modules)
        im.add_links([(int(a), int(b), float(w)) for a, b, w in edges])
        im.run()
        for node, module in dict(im.get_modules()).items():
            out[int(node)] = int(module)
    return out


def merge_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(C, n) confusion of cluster ids -> (C, max(mapping) + 1) confusion of the merged ids (columns summed)."""
    mapping = np.asarray(mapping, np.int64)
    out = np.zeros((conf.shape[0], int(mapping.max()) + 1), np.int64)
    np.add.at(out.T, mapping, np.asarray(conf, np.int64).T)
    return out


# ------------------------------------------------------------------------------------------- k-means


def kmeans_labels(points: np.ndarray, k: int, seed: int = 0, spherical: bool = False, niter: int = 100,
                  nredo: int = 5, chunk: int = 1 << 20) -> np.ndarray:
    """faiss ``Kmeans(d, k, niter, nredo, seed, spherical)`` (default 256 points per centroid) trained on ``points``
    (an (N, d) fp32 array or ``np.memmap``, not copied), then every point assigned in chunks (L2, or inner product
    for ``spherical``). Returns (N,) int64 labels."""
    import faiss

    n, d = points.shape
    if k > n:
        raise ValueError(f"k={k} exceeds the number of points ({n}); lower k or evaluate more images")
    with faiss_threads(n * k):
        km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False)
        km.train(points)
        out = np.empty(n, np.int64)
        for i in range(0, n, chunk):
            _, idx = km.index.search(np.ascontiguousarray(points[i:i + chunk], np.float32), 1)
            out[i:i + chunk] = idx[:, 0]
    return out


# ------------------------------------------------------------------------------------------- the evaluator


@dataclass
class UnsupSegConfig:
    """Options of protocol ``cbfe-cd`` (defaults = the reference)."""

    pca_dim: int = 50
    std_eps: float = 1e-5
    eval_size: int = 100
    k_fg: int = 200
    cluster_seed: int = 0
    niter: int = 100
    nredo: int = 5
    cut: tuple[float, float] = (0.55, 0.75)
    threshold_step: float = 0.05
    cbfe_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    cd_runs: int = 10
    distances: tuple[int, ...] = DISTANCES
    token_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.token_dtype not in ("float32", "float16"):
            raise ValueError(f"token_dtype={self.token_dtype!r}; choose float32 or float16")
        if not 0 < self.cut[0] < self.cut[1] <= 1:
            raise ValueError(f"cut={self.cut}: need 0 < lo < hi <= 1")
        if self.cd_runs < 1:
            raise ValueError(f"cd_runs={self.cd_runs} must be >= 1")


@dataclass
class UnsupSegResult:
    """``metrics``: ``cbfe_miou``, ``cd_miou``, ``cd_miou_std``, ``fg_jaccard`` (val, fractions); ``meta``: the chosen
    threshold, cut and hyper-parameters and their source, train Jaccard, edge and community counts; ``per_run``:
    val mIoU of each CD run; ``examples``: maps (val, first images, eval_size²) ``gt``, ``noisy_fg``, ``cbfe_fg``,
    ``clusters`` and ``communities`` (run 0) for figures; ``search``: the Optuna trials when searched."""

    metrics: dict[str, float]
    meta: dict
    per_run: list[float]
    examples: dict[str, np.ndarray] = field(default_factory=dict)
    search: list[dict] = field(default_factory=list)


class TrialFailed(RuntimeError):
    """A hyper-parameter setting the protocol rejects (too many communities, k above the foreground points)."""


class UnsupSegEvaluator:
    """Streaming evaluator of protocol ``cbfe-cd``.

    Call :meth:`add` per batch of each split (``"train"`` then or interleaved with ``"val"``), then :meth:`run`.
    Tokens go to ``.npy`` shards in a temporary folder (``workdir``; removed by :meth:`close` or at the end of a
    ``with`` block) while their moments accumulate; foreground points at ``eval_size``² go to one ``np.memmap``.
    RAM holds the PCA-projected tokens (N_img·h·w·pca_dim fp32), the masks and label maps at ``eval_size``² and
    the cluster maps (int16)."""

    SPLITS = ("train", "val")

    def __init__(self, num_classes: int, config: UnsupSegConfig | None = None, ignore_index: int = 255,
                 workdir: str | Path | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: the protocol needs a background class and at least one "
                             "object class")
        self.C, self.cfg, self.ignore_index = int(num_classes), config or UnsupSegConfig(), ignore_index
        self.tmp = Path(tempfile.mkdtemp(dir=workdir, prefix="dinokit-unsup-"))
        self.grid: tuple[int, int] | None = None
        self.moments: FeatureMoments | None = None
        self.shards: dict[str, list[Path]] = {s: [] for s in self.SPLITS}
        self.noisy: dict[str, list[torch.Tensor]] = {s: [] for s in self.SPLITS}
        self.gt: dict[str, list[torch.Tensor]] = {s: [] for s in self.SPLITS}
        self._proj: torch.Tensor | None = None
        self._cache: dict = {}

    # -------------------------------------------------------------- input
    def __enter__(self) -> UnsupSegEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary token shards and point memmaps."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def count(self, split: str) -> int:
        return sum(int(g.shape[0]) for g in self.gt[split])

    def add(self, split: str, tokens: torch.Tensor, noisy_fg: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch: ``tokens`` (B, h, w, D) final-norm patch tokens, ``noisy_fg`` (B, h', w') bool masks at any
        resolution (nearest-resized to eval_size²), ``gt`` (B, H, W) int labels (nearest-resized to eval_size²)."""
        if split not in self.SPLITS:
            raise ValueError(f"split={split!r}; choose train or val")
        if tokens.ndim != 4 or noisy_fg.ndim != 3 or gt.ndim != 3 or not (
                tokens.shape[0] == noisy_fg.shape[0] == gt.shape[0]):
            raise ValueError(f"expected tokens (B, h, w, D), masks (B, h', w'), labels (B, H, W) for the same B, got "
                             f"{tuple(tokens.shape)}, {tuple(noisy_fg.shape)}, {tuple(gt.shape)}")
        if self._proj is not None:
            raise RuntimeError("add() after run(): create a new evaluator")
        grid = tuple(tokens.shape[1:3])
        if self.grid is None:
            self.grid, D = grid, tokens.shape[-1]
            self.moments = FeatureMoments(D)
            if self.cfg.pca_dim > D:
                raise ValueError(f"pca_dim={self.cfg.pca_dim} exceeds the feature dimension {D}")
        elif grid != self.grid:
            raise ValueError(f"token grid {grid} differs from the first batch's {self.grid}: squash every image to "
                             "the same size")
        t = tokens.detach().float().cpu()
        self.moments.update(t.reshape(-1, t.shape[-1]))
        path = self.tmp / f"{split}_{len(self.shards[split]):06d}.npy"
        np.save(path, t.numpy().astype(self.cfg.token_dtype))
        self.shards[split].append(path)
        S = (self.cfg.eval_size, self.cfg.eval_size)
        self.noisy[split].append(torch_nearest(noisy_fg.detach().cpu().to(torch.uint8), S).bool())
        g = torch_nearest(gt.detach().cpu().long(), S)
        bad = torch.unique(g[(g != self.ignore_index) & ((g < 0) | (g >= self.C))])
        if bad.numel():
            raise ValueError(f"labels {bad[:10].tolist()} are outside [0, {self.C}) and not the ignore index "
                             f"{self.ignore_index}")
        self.gt[split].append(g.to(torch.int16))

    # -------------------------------------------------------------- stages
    def _n(self) -> tuple[int, int]:
        return self.count("train"), self.count("val")

    def projected(self) -> torch.Tensor:
        """(N_train + N_val, h, w, pca_dim) fp32 standardised PCA tokens (train first)."""
        if self._proj is None:
            if self.moments is None or min(self._n()) == 0:
                raise ValueError(f"need train and val images, got {self._n()}; add() both splits first")
            pca = fit_standardised_pca(self.moments, self.cfg.pca_dim, self.cfg.std_eps)
            parts = [pca(torch.from_numpy(np.load(p)).reshape(-1, self.moments.dim)).reshape(-1, *self.grid,
                                                                                              self.cfg.pca_dim)
                     for s in self.SPLITS for p in self.shards[s]]
            self._proj = torch.cat(parts)
        return self._proj

    def _maps(self, name: str) -> torch.Tensor:
        return torch.cat(self.noisy["train"] + self.noisy["val"]) if name == "noisy" else torch.cat(
            self.gt["train"] + self.gt["val"]).long()

    def cbfe(self) -> dict:
        """Stage 3: CBFE masks of both splits (cached). Returns ``fg`` (N, S, S) bool (train first), ``cut``
        (:class:`CBFECut`), ``precision_train``, ``precision_val``, ``clusters`` (N, S, S) int16."""
        if "cbfe" in self._cache:
            return self._cache["cbfe"]
        cfg = self.cfg
        proj = self.projected()
        N = proj.shape[0]
        lab = kmeans_labels(proj.reshape(-1, cfg.pca_dim).numpy(), cfg.k_fg, cfg.cluster_seed, True, cfg.niter,
                            cfg.nredo)
        S = (cfg.eval_size, cfg.eval_size)
        maps = torch_nearest(torch.from_numpy(lab).view(N, *self.grid), S)
        noisy, gt = self._maps("noisy"), self._maps("gt")
        nt = self.count("train")
        counts = cluster_counts(maps, cfg.k_fg)
        fg_counts = cluster_counts(maps, cfg.k_fg, noisy)
        p_tr, _ = cluster_precision(counts[:nt], fg_counts[:nt])
        p_va, _ = cluster_precision(counts[nt:], fg_counts[nt:])
        gt_fg = gt[:nt] != 0  # 255 counts as foreground, as the reference
        cut = cbfe_threshold(p_tr, counts[:nt], cluster_counts(maps[:nt], cfg.k_fg, gt_fg),
                             gt_fg.reshape(nt, -1).sum(1), cfg.cut[0], cfg.cut[1], cfg.threshold_step)
        fg = torch.cat([cbfe_foreground(maps[:nt], p_tr, cut.threshold),
                        cbfe_foreground(maps[nt:], p_va, cut.threshold)])
        out = {"fg": fg, "cut": cut, "precision_train": p_tr, "precision_val": p_va,
               "clusters": maps.to(torch.int16),
               "jaccard_train": foreground_jaccard(gt_fg, fg[:nt]),
               "jaccard_val": foreground_jaccard(gt[nt:] != 0, fg[nt:])}
        self._cache["cbfe"] = out
        return out

    def _points(self) -> tuple[np.memmap, torch.Tensor]:
        """Foreground points at eval_size² (nearest-upsampled PCA tokens) in a memmap, and the fg masks."""
        if "points" in self._cache:
            return self._cache["points"]
        fg = self.cbfe()["fg"]
        proj, S, d = self.projected(), self.cfg.eval_size, self.cfg.pca_dim
        h, w = self.grid
        rows = torch.div(torch.arange(S) * h, S, rounding_mode="floor")  # torch-nearest source indices
        cols = torch.div(torch.arange(S) * w, S, rounding_mode="floor")
        n_fg = int(fg.sum())
        if n_fg == 0:
            raise ValueError("CBFE kept no foreground pixel; check the noisy masks (--fg_source / --fg_masks)")
        pts = np.lib.format.open_memmap(self.tmp / "fg_points.npy", mode="w+", dtype=np.float32, shape=(n_fg, d))
        off = 0
        for i in range(0, proj.shape[0], 16):
            up = proj[i:i + 16][:, rows][:, :, cols]  # (b, S, S, d)
            sel = up[fg[i:i + 16]].numpy()
            pts[off:off + len(sel)] = sel
            off += len(sel)
        pts.flush()
        self._cache["points"] = (pts, fg)
        return pts, fg

    def fg_clusters(self, k: int, seed: int | None = None) -> torch.Tensor:
        """Stage 4: (N, S, S) int16 maps of k-means of the foreground points into ``k`` clusters, background = k."""
        seed = self.cfg.cluster_seed if seed is None else seed
        key = ("fg", k, seed)
        if key not in self._cache:
            pts, fg = self._points()
            if k > len(pts):
                raise TrialFailed(f"k={k} exceeds the {len(pts)} foreground points")
            lab = kmeans_labels(pts, k, seed, False, self.cfg.niter, self.cfg.nredo)
            maps = torch.full(fg.shape, k, dtype=torch.int16)
            maps[fg] = torch.from_numpy(lab).to(torch.int16)
            self._cache[key] = maps
        return self._cache[key]

    def _confusions(self, maps: torch.Tensor, n_pred: int) -> dict[str, np.ndarray]:
        nt = self.count("train")
        gt = self._maps("gt")
        return {s: ConfusionMatrix(self.C, n_pred, self.ignore_index).update(gt[sl], maps[sl].long()).numpy()
                for s, sl in (("train", slice(0, nt)), ("val", slice(nt, None)))}

    def cbfe_miou(self) -> float:
        """The CBFE score: foreground clustered into C − 1 (seeds ``cbfe_seeds``), Hungarian C × C on val, mean."""
        vals = []
        for s in self.cfg.cbfe_seeds:
            conf = self._confusions(self.fg_clusters(self.C - 1, s), self.C)["val"]
            vals.append(match_and_score(conf, matching="hungarian")["miou"])
        return float(np.mean(vals))

    def communities(self, k: int, markov_time: float, weight_threshold: float) -> dict:
        """Stage 5 for one setting: co-occurrence graph of the k + 1 fg-cluster ids over both splits, Infomap for
        ``cd_runs`` runs (run r uses infomap seed r + 1); ``mappings`` (runs, k + 1), ``edges``."""
        maps = self.fg_clusters(k)
        if ("adj", k) not in self._cache:
            self._cache[("adj", k)] = cooccurrence(maps.numpy(), k + 1, self.cfg.distances)
        edges = graph_edges(self._cache[("adj", k)], weight_threshold)
        mappings = np.stack([infomap_partition(edges, k + 1, markov_time, r + 1, self.C - 1)
                             for r in range(self.cfg.cd_runs)])
        return {"mappings": mappings, "edges": edges}

    def cd_scores(self, k: int, markov_time: float, weight_threshold: float, split: str = "val") -> dict:
        """mIoU of the merged clusters on ``split`` for every CD run (Hungarian, unmatched ids -> background)."""
        if ("conf", k) not in self._cache:
            self._cache[("conf", k)] = self._confusions(self.fg_clusters(k), k + 1)
        conf = self._cache[("conf", k)][split]
        cd = self.communities(k, markov_time, weight_threshold)
        mious, n_comm = [], []
        for m in cd["mappings"]:
            merged = merge_confusion(conf, m)
            n_comm.append(int(np.count_nonzero(merged.sum(0))))
            mious.append(match_and_score(merged, matching="hungarian")["miou"])
        return {"miou": mious, "n_communities": n_comm, "n_edges": len(cd["edges"]), "mappings": cd["mappings"]}

    # -------------------------------------------------------------- run
    def run(self, k_community: int | None = None, markov_time: float | None = None,
            weight_threshold: float | None = None, n_trials: int = 300, search_seed: int = 1000,
            k_range: tuple[int, int, int] = (69, 249, 10), mt_range: tuple[float, float, float] = (0.1, 2.0, 0.1),
            wt_range: tuple[float, float, float] = (0.01, 0.10, 0.01), n_examples: int = 4) -> UnsupSegResult:
        """The protocol: given hyper-parameters (all three), or an Optuna search over train mIoU when any is None."""
        given = None not in (k_community, markov_time, weight_threshold)
        trials: list[dict] = []
        if not given:
            best, trials = search_hyperparameters(self, n_trials, search_seed, k_range, mt_range, wt_range)
            k_community, markov_time, weight_threshold = best
        k, mt, wt = int(k_community), float(markov_time), float(weight_threshold)
        cb = self.cbfe()
        val = self.cd_scores(k, mt, wt, "val")
        train = self.cd_scores(k, mt, wt, "train")
        metrics = {"cbfe_miou": self.cbfe_miou(), "cd_miou": float(np.mean(val["miou"])),
                   "cd_miou_std": float(np.std(val["miou"])), "fg_jaccard": cb["jaccard_val"]}
        meta = {"cbfe_threshold": cb["cut"].threshold, "cbfe_cut": cb["cut"].start,
                "cbfe_precision_at_cut": cb["cut"].precision_at_cut, "fg_jaccard_train": cb["jaccard_train"],
                "k_community": k, "markov_time": mt, "weight_threshold": wt,
                "hp_source": "given" if given else f"optuna-tpe-s{search_seed}-n{n_trials}",
                "cd_miou_train": float(np.mean(train["miou"])), "n_edges": val["n_edges"],
                "n_communities": val["n_communities"], "n_train": self.count("train"), "n_val": self.count("val")}
        nt = self.count("train")
        sl = slice(nt, nt + n_examples)
        fgc = self.fg_clusters(k)
        examples = {"gt": self._maps("gt")[sl].numpy(), "noisy_fg": self._maps("noisy")[sl].numpy(),
                    "cbfe_fg": cb["fg"][sl].numpy(), "clusters": fgc[sl].numpy(),
                    "communities": val["mappings"][0][fgc[sl].long().numpy()]}
        return UnsupSegResult(metrics, meta, [float(v) for v in val["miou"]], examples, trials)


def search_hyperparameters(ev: UnsupSegEvaluator, n_trials: int = 300, seed: int = 1000,
                           k_range: tuple[int, int, int] = (69, 249, 10),
                           mt_range: tuple[float, float, float] = (0.1, 2.0, 0.1),
                           wt_range: tuple[float, float, float] = (0.01, 0.10, 0.01)
                           ) -> tuple[tuple[int, float, float], list[dict]]:
    """Optuna TPE (``seed``) over weight_threshold, markov_time (floats on their step grids) and k_community
    (int grid), maximising the mean train mIoU of the CD runs; one trial at a time. A setting giving more merged
    ids than classes, or k above the foreground points, fails its trial. Returns ((k, mt, wt), trial records)."""
    optuna = require("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> float:
        wt = round(trial.suggest_float("weight_threshold", wt_range[0], wt_range[1], step=wt_range[2]), 6)
        mt = round(trial.suggest_float("markov_time", mt_range[0], mt_range[1], step=mt_range[2]), 6)
        k = trial.suggest_int("k_community", k_range[0], k_range[1], step=k_range[2])
        res = ev.cd_scores(k, mt, wt, "train")
        if max(res["n_communities"]) > ev.C:
            raise TrialFailed(f"{max(res['n_communities'])} merged ids for {ev.C} classes")
        return float(np.mean(res["miou"]))

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials, catch=(TrialFailed,), n_jobs=1)
    records = [{"number": t.number, "state": t.state.name, "value": t.value, **t.params} for t in study.trials]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        raise ValueError(f"every one of the {n_trials} trials failed; widen the search ranges or add images")
    p = study.best_params
    return (int(p["k_community"]), round(p["markov_time"], 6), round(p["weight_threshold"], 6)), records
