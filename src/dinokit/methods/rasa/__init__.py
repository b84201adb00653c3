"""RASA: Removal of Absolute Spatial Attributes from patch tokens, pure torch (no Lightning). See docs/methods/rasa.md.

The package:

- :mod:`.head`: Gram-Schmidt bases, single-stage :func:`remove`, the sequential :class:`RASAHead`, its exact folded
  operator :class:`FoldedRASA` and :class:`RASATransform` (a ``DenseFeatures`` transform); the probe loss.
- :mod:`.checkpoint`: head files in the upstream (Franca) and native formats, :func:`load_rasa_head`,
  :func:`attach_rasa`.
- :mod:`.stages`: the stage loop :func:`run_stages` (stopping rule, audit, resumable checkpoints), validation,
  :func:`fit_rasa_features` on precomputed tokens, per-stage metric hooks and the stage curve.
- :mod:`.data`: training/validation transforms and datasets for fitting on a frozen backbone.
- :mod:`.lightning`: ``RASAStageModule`` and ``fit_rasa_backbone`` (the only module that imports Lightning; not
  imported here).

Importing this package registers :func:`attach_rasa` as the ``"rasa"`` feature transform of
:func:`dinokit.backbones.load_backbone` (``rasa=PATH``).

The position targets and the chance level are those of :mod:`dinokit.eval.position` (``position_targets`` is
(h, w, 2); :func:`flat_position_targets` is its (h*w, 2) view used by the probe loss).
"""

from ...backbones.backbone import register_feature_transform
from ...eval.position import chance_mse, position_targets
from .checkpoint import (
    PREFIXES,
    UPSTREAM_LAST,
    UPSTREAM_PRE,
    attach_rasa,
    head_from_state_dict,
    load_rasa_head,
    save_head,
    upstream_state_dict,
)
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagesOnly,
    collate_images,
    freeze,
    rasa_train_transform,
    rasa_val_transform,
    raw_features,
    val_masks,
)
from .head import (
    ACTIVATIONS,
    COL_TOL,
    ROW_TOL,
    FoldedRASA,
    RASACheckpointError,
    RASAHead,
    RASATransform,
    activate,
    compute_dtype,
    flat_position_targets,
    init_probe,
    orthonormal_basis,
    probe_mse,
    project_off,
    rasa_basis,
    remove,
)
from .stages import (
    RASAFitResult,
    StageRecord,
    cosine_lr,
    entropy_stage_metrics,
    fit_rasa_features,
    overcluster_stage_metrics,
    read_progress,
    run_stages,
    stage_curve,
    stage_curve_data,
    token_cosine,
    train_probe_on_batches,
    validate_probe,
)

register_feature_transform("rasa", attach_rasa)

__all__ = [
    "ACTIVATIONS", "COL_TOL", "IMAGENET_MEAN", "IMAGENET_STD", "PREFIXES", "ROW_TOL", "UPSTREAM_LAST", "UPSTREAM_PRE",
    "FoldedRASA", "ImagesOnly", "RASACheckpointError", "RASAFitResult", "RASAHead", "RASATransform", "StageRecord",
    "activate", "attach_rasa", "chance_mse", "collate_images", "compute_dtype", "cosine_lr", "entropy_stage_metrics",
    "fit_rasa_features", "flat_position_targets", "freeze", "head_from_state_dict", "init_probe", "load_rasa_head",
    "orthonormal_basis", "overcluster_stage_metrics", "position_targets", "probe_mse", "project_off", "rasa_basis",
    "rasa_train_transform", "rasa_val_transform", "raw_features", "read_progress", "remove", "run_stages",
    "save_head", "stage_curve", "stage_curve_data", "token_cosine", "train_probe_on_batches", "upstream_state_dict",
    "val_masks", "validate_probe",
]
