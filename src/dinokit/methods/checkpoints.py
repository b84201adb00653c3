"""Backbones from the Lightning checkpoints of the dinokit trainers (``neco fit``, ``bt fit``, ``seg fit``).

One reader for every trainer: it recognises the checkpoint by what its LightningModule stores, rebuilds the
backbone with ``load_backbone(name, weights="random", ...)`` and loads the trained weights strictly.

| trainer | recognised by | backbone keys | head keys | name and options from |
|---|---|---|---|---|
| NeCo | ``neco_meta`` | ``neco.<which>.model.*`` (student or teacher) | ``neco.<which>_head.*`` | ``neco_meta`` |
| Barlow Twins | ``model.backbone.model.*`` | ``model.backbone.model.*`` | ``model.projector.*`` | hyper-parameters |
| segmentation | ``backbone.model.*`` | ``backbone.model.*`` | ``head.*`` | hyper-parameters |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from ..backbones import Backbone, load_backbone

TRAINERS = ("neco", "bt", "seg")
# (trainer, backbone prefix, head prefix) of the checkpoints without neco_meta, most specific first
_PREFIXES = (("bt", "model.backbone.model.", "model.projector."), ("seg", "backbone.model.", "head."))


class TrainedBackbone(NamedTuple):
    """What :func:`load_checkpoint_backbone` returns (unpacks as ``bb, head, config``)."""

    backbone: Backbone  # the trained backbone; ``weights_info`` names the trainer, the checkpoint and ``which``
    head: dict[str, torch.Tensor]  # the trainer's head (NeCo projection head, BT projector, seg head), own keys
    config: dict  # the run's settings: the ``neco fit`` config, or the module's hyper-parameters


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_checkpoint_backbone(ckpt: str | Path, which: str = "student") -> TrainedBackbone:
    """Rebuild the backbone trained by a dinokit Lightning checkpoint (see the module table).

    Args:
        ckpt: a ``.ckpt`` written by ``dinokit neco fit``, ``dinokit bt fit`` or ``dinokit seg fit``.
        which: ``"student"`` (the trained network; the only one of bt and seg) or ``"teacher"`` (NeCo's EMA
            teacher).

    Returns:
        ``(backbone, head state dict, config)``; the backbone is on the CPU, in train mode.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r}; choose 'student' or 'teacher'")
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .ckpt written by `dinokit neco fit`, "
                                "`dinokit bt fit` or `dinokit seg fit` (e.g. runs/neco/checkpoints/last.ckpt)")
    state = torch.load(path, map_location="cpu", weights_only=False)  # a dinokit checkpoint: hyper-parameters too
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by "
                         "`dinokit neco fit`, `dinokit bt fit` or `dinokit seg fit`")
    sd = state["state_dict"]
    meta = state.get("neco_meta")
    if meta is not None:
        trainer, bb_prefix, head_prefix = "neco", f"neco.{which}.model.", f"neco.{which}_head."
        name, config = meta.get("backbone"), json.loads(meta.get("config", "{}"))
        options = dict(pos_interp=meta.get("pos_interp", "official"), size_policy=meta.get("size_policy", "error"),
                       model_kwargs=meta.get("model_kwargs") or None)
    else:
        found = [p for p in _PREFIXES if any(k.startswith(p[1]) for k in sd)]
        if not found:
            raise ValueError(f"{path} holds no backbone weights (neco_meta, model.backbone.model.* or "
                             "backbone.model.*); is it a checkpoint of `dinokit neco fit`, `bt fit` or `seg fit`?")
        trainer, bb_prefix, head_prefix = found[0]
        if which != "student":
            raise ValueError(f"{path} is a `dinokit {trainer} fit` checkpoint: it has one network, no teacher; "
                             "use which='student'")
        config = dict(state.get("hyper_parameters") or {})
        name = config.get("backbone")
        options = dict(model_kwargs=config.get("model_kwargs") or None)
    if not name:
        raise ValueError(f"{path} does not record its backbone name (neco_meta / hyper_parameters 'backbone')")
    bb_sd = _split(sd, bb_prefix)
    if not bb_sd:
        raise ValueError(f"{path} has no {which} weights ({bb_prefix}*); a NeCo run with use_teacher false has no "
                         "teacher")
    bb = load_backbone(name, weights="random", **options)
    missing, unexpected = bb.model.load_state_dict(bb_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the {which} weights do not fit {name}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    bb.weights_info = {"source": trainer, "checkpoint": str(path), "which": which}
    return TrainedBackbone(bb, _split(sd, head_prefix), config)
