"""Streaming confusion matrix and segmentation scores with Hungarian / many-to-one / no matching.

Spec: docs/eval/index.md A :class:`ConfusionMatrix` accumulates
``C[g, p]`` (int64, ``num_gt x num_pred``) batch by batch, so full-resolution predictions are never stored.
Matching maps predicted ids to ground-truth ids from ``C`` alone (exactly equivalent to remapping pixels) and
:func:`segmentation_scores` turns the remapped matrix into IoU / mIoU / pixel accuracy.
Under ``torch.distributed`` the matrices of all ranks are summed with ``all_reduce`` before any matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MATCHINGS = ("none", "hungarian", "many_to_one")


def _as_long_tensor(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError(f"{what} holds non-integer values; pass integer class ids")
    return x.long()


class ConfusionMatrix:
    """Streaming ``num_gt x num_pred`` confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_gt: number of ground-truth classes (ids ``0..num_gt-1``).
        num_pred: number of predicted ids (clusters); defaults to ``num_gt``.
        ignore_index: ground-truth value that is skipped (``None``: nothing is ignored).
        device: where the matrix lives (updates are moved there).
    """

    def __init__(self, num_gt: int, num_pred: int | None = None, ignore_index: int | None = 255,
                 device: str | torch.device = "cpu"):
        if num_gt < 1:
            raise ValueError(f"num_gt must be >= 1, got {num_gt}")
        self.num_gt = int(num_gt)
        self.num_pred = int(num_pred if num_pred is not None else num_gt)
        if self.num_pred < 1:
            raise ValueError(f"num_pred must be >= 1, got {self.num_pred}")
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_gt, self.num_pred, dtype=torch.int64, device=device)

    def update(self, gt: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray) -> ConfusionMatrix:
        """Add one batch. ``gt`` and ``pred``: integer ids of the same shape (any shape, e.g. (B, H, W))."""
        gt = _as_long_tensor(gt, "gt").to(self.matrix.device)
        pred = _as_long_tensor(pred, "pred").to(self.matrix.device)
        if gt.shape != pred.shape:
            raise ValueError(f"gt shape {tuple(gt.shape)} != pred shape {tuple(pred.shape)}; resize the "
                             "prediction to the label resolution first")
        gt, pred = gt.reshape(-1), pred.reshape(-1)
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            gt, pred = gt[keep], pred[keep]
        if gt.numel() == 0:
            return self
        bad = (gt < 0) | (gt >= self.num_gt)
        if bool(bad.any()):
            vals = torch.unique(gt[bad])[:10].tolist()
            raise ValueError(f"ground-truth ids {vals} are outside the class set [0, {self.num_gt}) and are not the "
                             f"ignore index {self.ignore_index}; check num_classes / ignore_index for this dataset")
        badp = (pred < 0) | (pred >= self.num_pred)
        if bool(badp.any()):
            vals = torch.unique(pred[badp])[:10].tolist()
            raise ValueError(f"predicted ids {vals} are outside [0, {self.num_pred}); check num_pred / K")
        self.matrix += torch.bincount(gt * self.num_pred + pred, minlength=self.num_gt * self.num_pred).view(
            self.num_gt, self.num_pred)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same shape (e.g. from another shard)."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge confusion matrices of shapes {tuple(other.matrix.shape)} and "
                             f"{tuple(self.matrix.shape)}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self, group=None) -> ConfusionMatrix:
        """Sum the matrix over all ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM, group=group)
        return self

    def numpy(self) -> np.ndarray:
        """The matrix as an int64 numpy array (num_gt, num_pred)."""
        return self.matrix.cpu().numpy()

    def compute(self, matching: str = "none", absent: str = "zero", score: str = "precision",
                class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Match, remap and score; see :func:`segmentation_scores`. Returns a flat dict (``miou``, ...)."""
        return match_and_score(self.numpy(), matching=matching, absent=absent, score=score, class_names=class_names)


def dist_rank_world() -> tuple[int, int]:
    """(global rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_shard(n: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``range(n)`` this rank handles (global rank; default: the process
    group's, everything without one). The union over ranks is ``range(n)``, each index exactly once."""
    r0, w0 = dist_rank_world()
    rank, world = (r0 if rank is None else rank), (w0 if world is None else world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    return list(range(rank, n, world))


class SumReducer:
    """Streaming sums of named tensors (sufficient statistics), all-reduced (SUM) over ranks once at the end.

    ``add(name, x)`` accumulates ``x`` into ``sums[name]`` (fp64 for floats, int64 for integers) batch by batch;
    ``all_reduce()`` sums every entry over the process group (no-op without one) in a fixed name order.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor) -> SumReducer:
        x = torch.as_tensor(x)
        x = x.double() if x.is_floating_point() else x.long()
        if name in self.sums:
            if self.sums[name].shape != x.shape:
                raise ValueError(f"SumReducer {name!r}: shape {tuple(x.shape)} != {tuple(self.sums[name].shape)}")
            self.sums[name] += x.to(self.sums[name].device)
        else:
            self.sums[name] = x.clone()
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sums[name]

    def all_reduce(self, group=None) -> SumReducer:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for name in sorted(self.sums):
                dist.all_reduce(self.sums[name], op=dist.ReduceOp.SUM, group=group)
        return self


def iou_matrix(conf: np.ndarray) -> np.ndarray:
    """IoU(g, p) = C[g,p] / (r_g + k_p - C[g,p]) (0 where the denominator is 0); shape of ``conf``."""
    c = conf.astype(np.float64)
    den = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
    return np.divide(c, den, out=np.zeros_like(c), where=den > 0)


def match_clusters(conf: np.ndarray, matching: str = "hungarian", score: str = "precision") -> np.ndarray:
    """Mapping m (num_pred,) from predicted ids to ground-truth ids, computed from the confusion matrix.

    ``none``: identity (requires num_pred == num_gt). ``hungarian``: scipy ``linear_sum_assignment(1 - IoU)``
    on the rectangular matrix; unmatched predicted ids map to 0. ``many_to_one``: each p maps to
    ``argmax_g score(g, p)`` with ``score`` ``precision`` (C[g,p]/k_p) or ``iou``; ties go to the lowest g,
    empty clusters map to 0.
    """
    num_gt, num_pred = conf.shape
    if matching == "none":
        if num_gt != num_pred:
            raise ValueError(f"matching='none' needs num_pred == num_gt, got {num_pred} vs {num_gt}; "
                             "use 'hungarian' or 'many_to_one'")
        return np.arange(num_pred)
    if matching == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(1.0 - iou_matrix(conf))
        m = np.zeros(num_pred, dtype=np.int64)
        m[cols] = rows
        return m
    if matching == "many_to_one":
        c = conf.astype(np.float64)
        if score == "precision":
            k = c.sum(0, keepdims=True)
            s = np.divide(c, k, out=np.zeros_like(c), where=k > 0)
        elif score == "iou":
            s = iou_matrix(conf)
        else:
            raise ValueError(f"unknown many_to_one score {score!r}; choose 'precision' or 'iou'")
        return s.argmax(0).astype(np.int64)  # argmax returns the first maximum: lowest g; all-zero -> 0
    raise ValueError(f"unknown matching {matching!r}; choose one of {MATCHINGS}")


def remap_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """C' = C·M with M[p, m(p)] = 1: (num_gt, num_pred) -> (num_gt, num_gt)."""
    num_gt, num_pred = conf.shape
    out = np.zeros((num_gt, num_gt), dtype=np.int64)
    np.add.at(out.T, mapping, conf.T.astype(np.int64))
    return out


def segmentation_scores(conf: np.ndarray, absent: str = "zero",
                        class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Scores of a square (remapped) confusion matrix C' (num_gt, num_gt).

    TP_g = C'[g,g], FP_g = colsum - TP, FN_g = rowsum - TP, IoU_g = TP/(TP+FP+FN). ``absent="zero"``: classes
    with TP+FP+FN = 0 count as 0 in the mean; ``"nan"``: they are excluded. Returns ``miou``, ``pixel_acc`` and
    per class ``iou/<name>``, ``precision/<name>``, ``recall/<name>`` (fractions in [0, 1]).
    """
    if absent not in ("zero", "nan"):
        raise ValueError(f"unknown absent={absent!r}; choose 'zero' or 'nan'")
    c = conf.astype(np.float64)
    tp = np.diag(c)
    fp = c.sum(0) - tp
    fn = c.sum(1) - tp
    den = tp + fp + fn
    iou = np.divide(tp, den, out=np.full_like(tp, np.nan), where=den > 0)
    if absent == "zero":
        miou = float(np.nan_to_num(iou, nan=0.0).mean())
    else:
        miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    total = c.sum()
    out: dict[str, float] = {"miou": miou, "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0}
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for {len(tp)} classes")
    prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    rec = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    for i, n in enumerate(names):
        out[f"iou/{n}"] = float(0.0 if np.isnan(iou[i]) and absent == "zero" else iou[i])
        out[f"precision/{n}"] = float(prec[i])
        out[f"recall/{n}"] = float(rec[i])
    return out


def match_and_score(conf: np.ndarray, matching: str = "none", absent: str = "zero", score: str = "precision",
                    class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Match predicted ids to classes, remap C and score it. Adds ``bg_frac`` for ``many_to_one``."""
    conf = np.asarray(conf)
    mapping = match_clusters(conf, matching, score)
    out = segmentation_scores(remap_confusion(conf, mapping), absent=absent, class_names=class_names)
    if matching == "many_to_one":
        out["bg_frac"] = float((mapping == 0).mean())
    return out


def miou(gt: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray, num_classes: int,
         num_pred: int | None = None, matching: str = "none", ignore_index: int | None = 255,
         absent: str = "zero") -> float:
    """One-shot mIoU of integer maps ``gt`` and ``pred`` (same shape)."""
    cm = ConfusionMatrix(num_classes, num_pred, ignore_index).update(gt, pred)
    return cm.compute(matching=matching, absent=absent)["miou"]
