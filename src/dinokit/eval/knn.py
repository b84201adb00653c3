"""Weighted k-NN classification of global features (DINO's protocol), streaming over the train memory.

Train features are the memory, test features the queries; both are L2-normalised, so the inner product is the
cosine similarity. For each query the k most similar memory rows vote for their class with weight exp(sim / T)
(T = 0.07); the class scores sort the predictions, giving top-1 and top-5 accuracy. Every k of ``ks`` (default
10, 20, 100, 200) comes out of one pass: a running top-max(ks) list is merged chunk by chunk over the memory, so
the memory may be larger than the device (it streams from CPU in chunks) and the result equals the one-shot
search. Under ``torch.distributed`` each rank scores its strided share of the queries and the hit counts are
all-reduced. See docs/eval/knn.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
FEATURES = ("cls", "avgpool", "cls+avgpool")


def global_features(feats, kind: str = "cls") -> torch.Tensor:
    """(B, D') features of a :class:`~dinokit.backbones.DenseFeatures`: ``cls`` (the CLS token after the final
    norm), ``avgpool`` (mean of the patch tokens, registers excluded) or ``cls+avgpool`` (their concatenation).
    Not normalised (see :func:`knn_classify`)."""
    if kind not in FEATURES:
        raise ValueError(f"feature={kind!r}; choose one of {FEATURES}")
    if kind in ("cls", "cls+avgpool") and feats.cls is None:
        raise ValueError("this backbone has no CLS token (ResNet); use feature='avgpool'")
    avg = feats.patch.float().mean(dim=(1, 2))
    if kind == "cls":
        return feats.cls.float()
    if kind == "avgpool":
        return avg
    return torch.cat([feats.cls.float(), avg], dim=1)


@dataclass
class KNNResult:
    """``metrics``: ``knn{k}/top1`` and ``knn{k}/top5`` (fractions in [0, 1]) for every k; ``n_queries``: queries
    scored (all ranks); ``neighbours``: (Q_local, max k) memory indices of this rank's queries, most similar first,
    kept only with ``keep_neighbours``."""

    metrics: dict[str, float]
    n_queries: int
    neighbours: torch.Tensor | None = None


def _chunks(memory, labels, chunk: int):
    """(features chunk, labels chunk, global offset) over a tensor or a sequence of tensors."""
    if isinstance(memory, torch.Tensor):
        memory, labels = [memory], [labels]
    off = 0
    for m, lab in zip(memory, labels):
        m, lab = torch.as_tensor(m), torch.as_tensor(lab)
        if m.shape[0] != lab.shape[0]:
            raise ValueError(f"a memory chunk has {m.shape[0]} features but {lab.shape[0]} labels")
        for i in range(0, m.shape[0], chunk):
            yield m[i:i + chunk], lab[i:i + chunk], off + i
        off += m.shape[0]


def _count(memory) -> int:
    return int(memory.shape[0]) if isinstance(memory, torch.Tensor) else sum(int(m.shape[0]) for m in memory)


@torch.no_grad()
def knn_classify(memory: torch.Tensor | Sequence[torch.Tensor], memory_labels: torch.Tensor | Sequence[torch.Tensor],
                 queries: torch.Tensor, query_labels: torch.Tensor, num_classes: int | None = None,
                 ks: Sequence[int] = KS, temperature: float = TEMPERATURE, normalize: bool = True,
                 query_chunk: int = 1024, memory_chunk: int = 65536, device: str | torch.device | None = None,
                 shard: bool = True, keep_neighbours: bool = False) -> KNNResult:
    """Weighted k-NN accuracy of ``queries`` (Q, D) against the ``memory`` (N, D) (or a list of (N_i, D) chunks).

    Args:
        memory, memory_labels: train features and int labels (tensors or matching lists of chunks; kept where
            they are and moved to ``device`` one chunk at a time).
        queries, query_labels: test features (Q, D) and int labels (Q,).
        num_classes: C (default: 1 + the largest label seen).
        ks: neighbour counts, all from one pass; each must be <= N.
        temperature: T of the vote weights exp(sim / T).
        normalize: L2-normalise memory and queries (eps 1e-12) as DINO does; False if already normalised.
        query_chunk, memory_chunk: rows per matrix product.
        device: where the products run (default: the queries' device).
        shard: under ``torch.distributed`` score only this rank's strided share and all-reduce the hit counts.
        keep_neighbours: return the (Q_local, max k) neighbour indices too.
    """
    ks = sorted({int(k) for k in ks})
    n_mem = _count(memory)
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks}: every k must be >= 1")
    if ks[-1] > n_mem:
        raise ValueError(f"k={ks[-1]} exceeds the memory size ({n_mem} train samples); pass smaller --ks")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (DINO: 0.07)")
    device = torch.device(device) if device is not None else queries.device
    queries, query_labels = torch.as_tensor(queries), torch.as_tensor(query_labels).long()
    if queries.shape[0] != query_labels.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {query_labels.shape[0]} query labels")
    if num_classes is None:
        labs = [memory_labels] if isinstance(memory_labels, torch.Tensor) else list(memory_labels)
        num_classes = 1 + max(int(torch.as_tensor(lab).max()) for lab in labs + [query_labels])
    from .hummingbird import rank_shard

    mine = rank_shard(queries.shape[0]) if shard else list(range(queries.shape[0]))
    kmax, C = ks[-1], int(num_classes)
    hits = torch.zeros(len(ks), 2, dtype=torch.float64, device=device)  # (k, [top1, top5])
    kept = []
    for s in range(0, len(mine), query_chunk):
        qi = torch.as_tensor(mine[s:s + query_chunk], dtype=torch.long)
        q = queries[qi].to(device).float()
        y = query_labels[qi].to(device)
        if normalize:
            q = F.normalize(q, dim=1)
        best_s = torch.full((q.shape[0], 0), -float("inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        best_y = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for m, lab, off in _chunks(memory, memory_labels, memory_chunk):
            m = m.to(device).float()
            if normalize:
                m = F.normalize(m, dim=1)
            sim = q @ m.T
            v, j = sim.topk(min(kmax, sim.shape[1]), dim=1)
            cand_s = torch.cat([best_s, v], 1)
            cand_i = torch.cat([best_i, j + off], 1)
            cand_y = torch.cat([best_y, lab.to(device).long()[j]], 1)
            # merge: the kmax largest; ties keep the earlier memory index (stable sort of the concatenation)
            order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :kmax]
            best_s, best_i, best_y = cand_s.gather(1, order), cand_i.gather(1, order), cand_y.gather(1, order)
        for a, k in enumerate(ks):
            w = (best_s[:, :k] / temperature).exp()
            scores = torch.zeros(q.shape[0], C, dtype=w.dtype, device=device).scatter_add_(1, best_y[:, :k], w)
            pred = torch.sort(scores, dim=1, descending=True, stable=True).indices
            correct = pred[:, :min(5, k, C)] == y[:, None]
            hits[a, 0] += correct[:, 0].sum()
            hits[a, 1] += correct.any(1).sum()
        if keep_neighbours:
            kept.append(best_i.cpu())
    total = torch.tensor(float(len(mine)), dtype=torch.float64, device=device)
    import torch.distributed as dist

    if shard and dist.is_available() and dist.is_initialized():
        dist.all_reduce(hits)
        dist.all_reduce(total)
    n = int(total.item())
    if n == 0:
        raise ValueError("k-NN over 0 queries (empty test split)")
    h = hits.cpu().numpy() / n
    metrics: dict[str, float] = {}
    for a, k in enumerate(ks):
        metrics[f"knn{k}/top1"], metrics[f"knn{k}/top5"] = float(h[a, 0]), float(h[a, 1])
    return KNNResult(metrics, n, torch.cat(kept) if kept else None)


def nearest_neighbour_labels(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Exact 1-NN class of each query by cosine similarity (reference for k = 1; ties to the lowest index)."""
    s = F.normalize(queries.float(), dim=1) @ F.normalize(memory.float(), dim=1).T
    return memory_labels[s.argmax(1)].numpy()
