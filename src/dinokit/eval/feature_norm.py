"""Feature-norm statistics: the distribution of the per-token L2 norm of patch features (a sanity check that
catches collapsed or exploding features). See docs/architecture.md, where this evaluator is the worked example."""

from __future__ import annotations

import torch

from ._inputs import as_features


def feature_norm(feats: torch.Tensor) -> dict[str, float]:
    """(B, h, w, D) patch tokens -> ``{"mean", "std", "min", "max"}`` of the per-token L2 norm (fp64 sums)."""
    n = as_features(feats).double().norm(dim=-1).flatten()
    return {"mean": float(n.mean()), "std": float(n.std(unbiased=False)), "min": float(n.min()),
            "max": float(n.max())}
