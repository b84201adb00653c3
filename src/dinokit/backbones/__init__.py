"""Backbones: timm models behind the dense contract. See docs/backbones.md."""

from .backbone import AttentionUnavailableError, Backbone, load_backbone, resolve_name
from .features import AttentionMaps, DenseFeatures, Facets
from .registry import REGISTRY, supported_names
from .weights import CheckpointMismatchError, CheckpointReadError, WeightsUnavailableError

__all__ = [
    "AttentionMaps", "AttentionUnavailableError", "Backbone", "CheckpointMismatchError", "CheckpointReadError",
    "DenseFeatures", "Facets", "REGISTRY", "WeightsUnavailableError", "load_backbone", "resolve_name",
    "supported_names",
]
