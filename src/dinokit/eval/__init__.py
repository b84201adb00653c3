"""dinokit.eval: the dense evaluation suite (spec docs/eval/index.md).

Every evaluator takes patch features ``(B, h, w, D)`` (torch or numpy, CLS/registers removed) plus integer masks:

- :mod:`.metrics`: :class:`ConfusionMatrix` (streaming, ``all_reduce`` under DDP), matchings, mIoU.
- :mod:`.overcluster`: :func:`overcluster` (standardise, PCA-50, faiss k-means for several K and seeds).
- :mod:`.linear_seg`: :func:`linear_probe` (stacked 1x1-conv heads, several learning rates in one pass).
- :mod:`.hummingbird`: :func:`hummingbird` (bounded memory bank, exact kNN via faiss or torch, soft labels).
- :mod:`.position`: :func:`position_probe`, :func:`position_targets`, :func:`chance_mse`.
- :mod:`.entropy`: :func:`spatial_entropy` (``se1``).
- :mod:`.boxes`: :func:`box_iou`, :func:`box_aiou`, :func:`maiou`, :func:`corloc`.
- :mod:`.suite`: :func:`dense_eval_suite`, one call for before/after numbers in the demo stages.
"""

from .boxes import box_aiou, box_iou, corloc, maiou, miou_box
from .entropy import spatial_entropy, spatial_entropy_of_features
from .hummingbird import HummingbirdEvaluator, HummingbirdResult, MemoryBuilder, build_memory, hummingbird, knn_search
from .linear_seg import LinearProbeResult, linear_probe
from .metrics import ConfusionMatrix, match_and_score, match_clusters, miou, segmentation_scores
from .overcluster import OverclusterResult, overcluster
from .position import PositionResult, chance_mse, position_probe, position_targets
from .suite import dense_eval_suite

__all__ = [
    "ConfusionMatrix", "HummingbirdEvaluator", "HummingbirdResult", "LinearProbeResult", "MemoryBuilder",
    "OverclusterResult", "PositionResult", "box_aiou", "box_iou", "build_memory", "chance_mse", "corloc",
    "dense_eval_suite", "hummingbird", "knn_search", "linear_probe", "maiou", "match_and_score", "match_clusters",
    "miou", "miou_box", "overcluster", "position_probe", "position_targets", "segmentation_scores", "spatial_entropy",
    "spatial_entropy_of_features",
]
