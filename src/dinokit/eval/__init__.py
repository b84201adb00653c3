"""dinokit.eval: the dense evaluation suite (spec ``shared/spec/dense_eval.md``).

Every evaluator takes patch features ``(B, h, w, D)`` (torch or numpy, CLS/registers removed) plus integer masks:

- :mod:`.metrics`: :class:`ConfusionMatrix` (streaming, ``all_reduce`` under DDP), matchings, mIoU.
- :mod:`.overcluster`: :func:`overcluster` (standardise, PCA-50, faiss k-means for several K and seeds).
- :mod:`.position`: :func:`position_probe`, :func:`position_targets`, :func:`chance_mse`.
"""

from .metrics import ConfusionMatrix, match_and_score, match_clusters, miou, segmentation_scores
from .overcluster import OverclusterResult, overcluster
from .position import PositionResult, chance_mse, position_probe, position_targets

__all__ = [
    "ConfusionMatrix", "OverclusterResult", "PositionResult", "chance_mse", "match_and_score", "match_clusters",
    "miou", "overcluster", "position_probe", "position_targets", "segmentation_scores",
]
