"""Hummingbird dense nearest-neighbour retrieval (in-context segmentation), protocol ``hb2`` (docs/eval/hummingbird.md).

Memory: L2-normalised patch tokens of the train split (optionally E augmented passes) with soft cell labels
(histogram of each cell's p x p pixel classes / p², ignore -> 0), bounded to M rows by class-frequency-aware
sampling (rare classes favoured). Query: each val token retrieves its k = 30 largest inner products; weights =
softmax(cos / β) with β = 0.02; ŷ = Σ a_i y_i. ŷ (C, h, w) is bilinearly upsampled to the label size, argmaxed and
streamed into a C x C confusion matrix (never stored), scored with Hungarian matching.

kNN backends (exact): ``faiss-cpu`` (``IndexFlatIP``), ``faiss-gpu`` (``GpuIndexFlatIP``), ``torch`` (chunked q·Mᵀ
with a running top-k merge; the memory may stay on CPU); ``auto`` = faiss-gpu > faiss-cpu > torch. Approximate
``ivf{nlist}-p{nprobe}`` uses faiss IVF-Flat. Under ``torch.distributed`` val images are sharded by rank and the
confusion matrices all-reduced (the memory is built identically on every rank).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ._inputs import MaskLike, as_features, as_masks, check_labels
from .metrics import ConfusionMatrix, match_and_score, rank_shard

EMPTY_CELL_SCORE = 1e6


def memory_quota(memory_size: int | None, n_images: int, epochs: int = 1) -> int | None:
    """Cells kept per image and pass: q = max(1, floor(M / max(1, N·E))); None when unbounded."""
    if memory_size is None:
        return None
    return max(1, memory_size // max(1, n_images * epochs))


def soft_cell_labels(masks: torch.Tensor, grid: tuple[int, int], num_classes: int,
                     ignore_index: int | None = 255, ignore_to: int = 0) -> torch.Tensor:
    """(B, H, W) int masks -> (B, h, w, C) soft labels: per cell the histogram of its pixel classes / pixels.

    H, W must be multiples of the grid (cells of (H/h) x (W/w) pixels). ``ignore_index`` pixels count as
    class ``ignore_to`` (upstream: VOC 255 -> 0; memory only). One bincount over (cell, class) pairs: memory
    O(B·H·W), never a per-pixel one-hot.
    """
    b, hh, ww = masks.shape
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"mask size {hh}x{ww} is not a multiple of the feature grid {h}x{w}; resize masks to "
                         "grid x patch size (squash S)")
    m = masks.long()
    if ignore_index is not None:
        m = torch.where(m == ignore_index, torch.full_like(m, ignore_to), m)
    check_labels(m, num_classes, None)
    ph, pw = hh // h, ww // w
    rows = torch.arange(hh, device=m.device) // ph
    cols = torch.arange(ww, device=m.device) // pw
    cell = (torch.arange(b, device=m.device)[:, None, None] * (h * w) + rows[None, :, None] * w + cols[None, None, :])
    counts = torch.bincount((cell * num_classes + m).reshape(-1), minlength=b * h * w * num_classes)
    return (counts.view(b, h, w, num_classes).float() / (ph * pw))


def sample_cells(labels: torch.Tensor, quota: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the ``quota`` cells of one image to keep, rare classes first.

    labels: (N, C) soft labels of the image's cells. f_c = number of cells containing class c;
    score_i = Σ_{c in cell i} f_c (1e6 for a cell without pixels) times u_i ~ U(0, 1); keep the lowest.
    """
    present = labels > 0
    f = present.sum(0).double()
    score = (present.double() * f).sum(1)
    score = torch.where(present.any(1), score, torch.full_like(score, EMPTY_CELL_SCORE))
    u = torch.rand(labels.shape[0], generator=generator, dtype=torch.float64)
    return torch.argsort(score * u)[:quota]


@dataclass
class MemoryBank:
    """features (R, D) L2-normalised (fp32 or fp16); labels (R, C) soft labels (rows sum to 1)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


class MemoryBuilder:
    """Streaming construction of a bounded memory bank: add train batches as they are extracted; only the q sampled
    cells of each image are kept (q from :func:`memory_quota` of ``memory_size`` and the total number of feature
    maps ``n_views`` = N_train·E). Sampling of view ``i`` uses a CPU generator seeded by (seed, i), so batching and
    sharding do not change the result."""

    def __init__(self, num_classes: int, n_views: int, memory_size: int | None = 102_400, seed: int = 0,
                 ignore_index: int | None = 255, ignore_to: int = 0, mem_dtype: torch.dtype = torch.float32):
        if n_views < 1:
            raise ValueError("the memory split is empty (0 images); check the train split")
        self.num_classes, self.seed, self.ignore_index, self.ignore_to = num_classes, seed, ignore_index, ignore_to
        self.quota = memory_quota(memory_size, n_views, 1)
        self.mem_dtype = mem_dtype
        self._feats: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._next = 0

    def add(self, feats: torch.Tensor | np.ndarray, masks: MaskLike, index: Sequence[int] | None = None) -> None:
        """Add views: feats (b, h, w, D), masks (b, H, W) at grid x patch size; ``index`` = global view ids."""
        f = as_features(feats, "memory features")
        b, h, w, d = f.shape
        m = as_masks(masks, b, "memory masks")
        if isinstance(m, list):
            m = torch.stack(m)
        labels = soft_cell_labels(m, (h, w), self.num_classes, self.ignore_index, self.ignore_to).reshape(b, h * w, -1)
        f = F.normalize(f, dim=-1, eps=1e-12).reshape(b, h * w, d)
        idx = list(index) if index is not None else list(range(self._next, self._next + b))
        self._next = max(self._next, max(idx) + 1)
        if self.quota is None or self.quota >= h * w:
            self._feats.append(f.reshape(-1, d).to(self.mem_dtype))
            self._labels.append(labels.reshape(-1, self.num_classes))
            return
        for i in range(b):
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(idx[i]))
            keep = sample_cells(labels[i], self.quota, g)
            self._feats.append(f[i, keep].to(self.mem_dtype))
            self._labels.append(labels[i, keep])

    def build(self) -> MemoryBank:
        if not self._feats:
            raise ValueError("no memory views were added")
        return MemoryBank(torch.cat(self._feats), torch.cat(self._labels))


def build_memory(feats: torch.Tensor | np.ndarray, masks: MaskLike, num_classes: int,
                 memory_size: int | None = 102_400, epochs: int = 1, seed: int = 0,
                 ignore_index: int | None = 255, ignore_to: int = 0, mem_dtype: torch.dtype = torch.float32,
                 image_index: Sequence[int] | None = None, chunk: int = 64) -> MemoryBank:
    """Memory bank from train features (B, h, w, D) and masks (B, H, W) at grid x patch-size resolution.

    ``B`` = N_train·E feature maps (E augmented passes stacked); the per-image quota is computed from
    ``memory_size`` and B (``epochs`` only documents how many passes B holds). See :class:`MemoryBuilder` for
    streaming construction without holding every train feature map.
    """
    f = as_features(feats, "memory features")
    m = as_masks(masks, f.shape[0], "memory masks")
    if isinstance(m, list):
        m = torch.stack(m)
    idx = list(image_index) if image_index is not None else list(range(f.shape[0]))
    mb = MemoryBuilder(num_classes, f.shape[0], memory_size, seed, ignore_index, ignore_to, mem_dtype)
    for s in range(0, f.shape[0], chunk):
        mb.add(f[s:s + chunk], m[s:s + chunk], idx[s:s + chunk])
    return mb.build()


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``faiss-gpu`` if available, else ``faiss-cpu`` if faiss imports, else ``torch``."""
    if backend != "auto":
        return backend
    try:
        import faiss
    except ImportError:
        return "torch"
    return "faiss-gpu" if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else "faiss-cpu"


def knn_search(queries: torch.Tensor, memory: torch.Tensor, k: int, backend: str = "auto",
               chunk: int = 65536, query_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products: queries (Q, D), memory (R, D) -> (scores (Q, k), indices (Q, k) int64).

    ``torch`` streams the memory in ``chunk`` rows (moved to the queries' device) and merges running top-k lists.
    """
    backend = resolve_backend(backend)
    if k > memory.shape[0]:
        raise ValueError(f"k={k} neighbours requested from a memory of {memory.shape[0]} rows; lower k or enlarge "
                         "the memory")
    if backend == "torch":
        out_s, out_i = [], []
        for qs in range(0, queries.shape[0], query_chunk):
            q = queries[qs:qs + query_chunk].float()
            best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
            best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
            for ms in range(0, memory.shape[0], chunk):
                mem = memory[ms:ms + chunk].to(q.device, torch.float32)
                s, i = torch.topk(q @ mem.T, min(k, mem.shape[0]), dim=1)
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ms], 1)
                best_s, j = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
                best_i = torch.gather(cat_i, 1, j)
            out_s.append(best_s)
            out_i.append(best_i)
        return torch.cat(out_s), torch.cat(out_i)
    import faiss

    from .overcluster import faiss_threads

    mem = np.ascontiguousarray(memory.detach().cpu().float().numpy())
    d = mem.shape[1]
    approx = re.fullmatch(r"ivf(\d+)-p(\d+)", backend)
    if backend in ("faiss-cpu", "faiss-gpu"):
        index = faiss.IndexFlatIP(d)
        if backend == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)
    elif approx:
        nlist, nprobe = int(approx.group(1)), int(approx.group(2))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(mem)
        index.nprobe = nprobe
    else:
        raise ValueError(f"unknown kNN backend {backend!r}; choose auto, faiss-cpu, faiss-gpu, torch or ivf<N>-p<M>")
    with faiss_threads(float(queries.shape[0]) * mem.shape[0] / 64):
        index.add(mem)
        s, i = index.search(np.ascontiguousarray(queries.detach().cpu().float().numpy()), k)
    return torch.from_numpy(s).to(queries.device), torch.from_numpy(i).to(queries.device)


def soft_predict(queries: torch.Tensor, memory: MemoryBank, k: int = 30, beta: float = 0.02,
                 backend: str = "auto") -> torch.Tensor:
    """Soft label predictions (Q, C) of query tokens (Q, D): softmax over the k neighbours of cos/β."""
    scores, idx = knn_search(queries, memory.features, k, backend)
    qn = queries.float().norm(dim=1, keepdim=True).clamp_min(1e-12).to(scores.device)
    mn = memory.features.float().norm(dim=1).clamp_min(1e-12).to(idx.device)[idx]
    a = torch.softmax(scores / qn / mn / beta, dim=1)
    return torch.einsum("qk,qkc->qc", a, memory.labels.to(a.device)[idx])


@dataclass
class HummingbirdResult:
    """``metrics``: ``miou``, ``pixel_acc``, ``mem_rows``, per-class IoU; ``confusion``: (C, C) int64 (before
    matching); ``examples``: argmax label maps of the first ``n_examples`` val images (label resolution)."""

    metrics: dict[str, float]
    confusion: np.ndarray
    examples: list[np.ndarray] = field(default_factory=list)


def hummingbird(train_feats: torch.Tensor | np.ndarray | MemoryBank, train_masks: MaskLike | None,
                val_feats: torch.Tensor | np.ndarray, val_masks: MaskLike, num_classes: int,
                k: int = 30, beta: float = 0.02,
                memory_size: int | None = 102_400, backend: str = "auto", matching: str = "hungarian",
                ignore_index: int | None = 255, memory_ignore_to: int = 0, seed: int = 0, batch_size: int = 16,
                mem_dtype: torch.dtype = torch.float32, n_examples: int = 0,
                class_names: Sequence[str] | None = None) -> HummingbirdResult:
    """Hummingbird mIoU of val features against a memory built from train features.

    Args:
        train_feats: (N_train·E, h, w, D) memory features; train_masks (N_train·E, H, W) at grid x patch size;
            or a prebuilt :class:`MemoryBank` (e.g. from :class:`MemoryBuilder`; train_masks is then ignored).
        val_feats: (B, h', w', D) query features; val_masks (B, H, W) or a list of (H_i, W_i) label maps.
        num_classes: C (memory bins and confusion matrix size).
        memory_size: M rows (None = unbounded, all cells).
        backend: kNN backend (see :func:`knn_search`).
        matching: ``hungarian`` (upstream default) or ``none``.
    Returns:
        :class:`HummingbirdResult`; under DDP the val split is sharded by rank and the confusion all-reduced.
    """
    if isinstance(train_feats, MemoryBank):
        mem = train_feats
    else:
        mem = build_memory(train_feats, train_masks, num_classes, memory_size, seed=seed, ignore_index=ignore_index,
                           ignore_to=memory_ignore_to, mem_dtype=mem_dtype)
    vf = as_features(val_feats, "val features")
    vm = as_masks(val_masks, vf.shape[0], "val masks")
    ev = HummingbirdEvaluator(mem, num_classes, k, beta, backend, ignore_index)
    examples: list[np.ndarray] = []
    mine = rank_shard(vf.shape[0])
    for s in range(0, len(mine), batch_size):
        ids = mine[s:s + batch_size]
        want = any(i < n_examples for i in ids)
        preds = ev.update(vf[ids], [vm[i] for i in ids], return_predictions=want)
        if want:
            examples.extend(p.numpy() for i, p in zip(ids, preds, strict=True) if i < n_examples)
    return ev.compute(matching=matching, class_names=class_names, examples=examples)


class HummingbirdEvaluator:
    """Streaming Hummingbird evaluation against a fixed memory: ``update`` per val batch (only a C x C confusion
    matrix is kept), ``compute`` all-reduces it under DDP (callers shard the val images by rank) and scores it."""

    def __init__(self, memory: MemoryBank, num_classes: int, k: int = 30, beta: float = 0.02, backend: str = "auto",
                 ignore_index: int | None = 255):
        self.memory, self.num_classes, self.k, self.beta, self.backend = memory, num_classes, k, beta, backend
        self.ignore_index = ignore_index
        self.cm = ConfusionMatrix(num_classes, num_classes, ignore_index)

    def update(self, feats: torch.Tensor | np.ndarray, masks: MaskLike,
               return_predictions: bool = False) -> list[torch.Tensor]:
        """feats (b, h, w, D) val tokens; masks (b, H, W) or b maps (H_i, W_i). Returns the argmax maps if asked."""
        f = as_features(feats, "val features")
        b, h, w, d = f.shape
        if d != self.memory.features.shape[1]:
            raise ValueError(f"val features have D={d} but the memory has D={self.memory.features.shape[1]}; use "
                             "one backbone for memory and queries")
        m = as_masks(masks, b, "val masks")
        check_labels(m, self.num_classes, self.ignore_index)
        y = soft_predict(f.reshape(-1, d), self.memory, self.k, self.beta, self.backend)
        y = y.view(b, h, w, self.num_classes).permute(0, 3, 1, 2)
        out = []
        for j in range(b):  # one image at a time: a single (C, H, W) upsampled map is alive
            pred = F.interpolate(y[j:j + 1], size=tuple(m[j].shape[-2:]), mode="bilinear",
                                 align_corners=False).argmax(1)[0]
            self.cm.update(m[j], pred)
            if return_predictions:
                out.append(pred)
        return out

    def compute(self, matching: str = "hungarian", class_names: Sequence[str] | None = None,
                examples: list[np.ndarray] | None = None) -> HummingbirdResult:
        self.cm.all_reduce()
        conf = self.cm.numpy()
        metrics = match_and_score(conf, matching=matching, absent="zero", class_names=class_names)
        metrics["mem_rows"] = len(self.memory)
        return HummingbirdResult(metrics, conf, examples or [])


def select_subset(n: int, fraction: float | None = None, seed: int = 0) -> list[int]:
    """Seeded subset of ``round(fraction·n)`` (>= 1) indices out of ``range(n)``, sorted; all when None/1."""
    if fraction is None or fraction >= 1:
        return list(range(n))
    if not 0 < fraction < 1:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max(1, round(fraction * n))].tolist())
