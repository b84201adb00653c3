"""RASA head files: the upstream (Franca) ``torch.save`` format, the native safetensors format, reading either, and
attaching a head to a backbone. See docs/methods/rasa.md.

Upstream layout: ``pre_pos_layers.{i}.weight`` (i = 0..T-2) then ``pos_pred.weight``, each a (2, D) fp32 tensor in
stage order. Native: the same tensors in a safetensors file whose metadata records version, D, T, activation and
free-form provenance.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ...io import dinokit_version
from .head import FoldedRASA, RASACheckpointError, RASAHead, RASATransform

log = logging.getLogger(__name__)

UPSTREAM_PRE = re.compile(r"^pre_pos_layers\.(\d+)\.weight$")
UPSTREAM_LAST = "pos_pred.weight"
PREFIXES = ("module.", "rasa_head.", "head.")


def upstream_state_dict(head: RASAHead) -> dict[str, torch.Tensor]:
    """Franca's format of ``head``: ``pre_pos_layers.{i}.weight`` (i = 0..T-2), ``pos_pred.weight``; fp32 CPU (2, D)."""
    if head.n_stages == 0:
        raise RASACheckpointError("cannot write a RASA head with 0 stages in the upstream format")
    sw = head.stage_weights.detach().float().cpu()
    sd = {f"pre_pos_layers.{i}.weight": sw[i].clone() for i in range(head.n_stages - 1)}
    sd[UPSTREAM_LAST] = sw[-1].clone()
    return sd


def save_head(head: RASAHead, path: str | Path, format: str = "upstream", metadata: dict | None = None) -> Path:
    """Write ``head`` atomically: ``upstream`` (torch.save flat dict) or ``native`` (safetensors + metadata)."""
    from ...io import atomic_path

    path = Path(path)
    sd = upstream_state_dict(head)
    with atomic_path(path) as tmp:
        if format == "upstream":
            torch.save(sd, tmp)
        elif format == "native":
            from safetensors.torch import save_file

            md = {"dinokit_version": dinokit_version(), "embed_dim": str(head.embed_dim),
                  "n_stages": str(head.n_stages), "activation": head.activation}
            md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in {**head.meta,
                                                                                    **(metadata or {})}.items()})
            save_file(sd, str(tmp), metadata=md)
        else:
            raise ValueError(f"format={format!r}; choose 'upstream' or 'native'")
    return path


def head_from_state_dict(obj: dict, embed_dim: int | None = None, source: str = "state dict",
                         activation: str = "sigmoid") -> RASAHead:
    """Build a head from an upstream-format dict (Lightning ``state_dict`` and prefixes ``module.``, ``rasa_head.``,
    ``head.`` accepted). The number of stages is inferred; raises :class:`RASACheckpointError` on gaps, a missing
    ``pos_pred.weight``, non-(2, D) tensors, mixed D, or D != ``embed_dim``."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise RASACheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    sd: dict[str, torch.Tensor] = {}
    ignored = []
    for k, v in obj.items():
        key = str(k)
        stripped = True
        while stripped:
            stripped = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, stripped = key[len(p):], True
        if UPSTREAM_PRE.match(key) or key == UPSTREAM_LAST:
            if key in sd:
                raise RASACheckpointError(f"{source}: key {key!r} appears twice after stripping prefixes {PREFIXES}")
            sd[key] = v
        else:
            ignored.append(str(k))
    if ignored:
        log.info("%s: ignoring %d non-RASA keys (e.g. %s)", source, len(ignored), ignored[:3])
    if UPSTREAM_LAST not in sd:
        raise RASACheckpointError(f"{source}: no 'pos_pred.weight' key (found {sorted(sd)[:5] or 'no RASA keys'}); "
                                  "a RASA head needs pre_pos_layers.{i}.weight for i = 0..T-2 and pos_pred.weight")
    idx = sorted(int(UPSTREAM_PRE.match(k).group(1)) for k in sd if k != UPSTREAM_LAST)
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - set(idx)) if idx else []
        raise RASACheckpointError(f"{source}: stage indices pre_pos_layers.{{i}} are not contiguous from 0: found "
                                  f"{idx}, missing {missing}; the file is truncated or was edited")
    order = [f"pre_pos_layers.{i}.weight" for i in idx] + [UPSTREAM_LAST]
    tensors = []
    for k in order:
        t = sd[k]
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != 2:
            raise RASACheckpointError(f"{source}: {k} must be a (2, D) tensor, got "
                                      f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        tensors.append(t.detach().float().cpu())
    dims = sorted({t.shape[1] for t in tensors})
    if len(dims) != 1:
        raise RASACheckpointError(f"{source}: stage tensors have different dimensions D = {dims}")
    if embed_dim is not None and dims[0] != embed_dim:
        raise RASACheckpointError(f"{source}: head has D = {dims[0]} but the backbone's embed_dim is {embed_dim}; "
                                  "use a head fitted on this backbone")
    return RASAHead(dims[0], activation, torch.stack(tensors))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_rasa_head(path: str | Path, embed_dim: int | None = None) -> RASAHead:
    """Read a head file: upstream ``torch.save`` dict / Lightning checkpoint or native safetensors (auto)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RASA head file {path} does not exist; fit one with `dinokit rasa fit`")
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        head = head_from_state_dict(sd, embed_dim, str(path), md.get("activation", "sigmoid"))
        head.meta = {k: v for k, v in md.items() if k not in ("embed_dim", "n_stages", "activation")}
        return head
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report the file at fault
        raise RASACheckpointError(f"{path} is neither a safetensors nor a torch.save file readable with "
                                  f"weights_only=True: {err}") from err
    return head_from_state_dict(obj, embed_dim, str(path))


def attach_rasa(backbone, path_or_head: str | Path | RASAHead | FoldedRASA, mode: str = "auto"):
    """Set ``backbone.feature_transform`` to a :class:`RASATransform` (every consumer then sees debiased patch
    tokens). ``path_or_head``: a head file (upstream or native), a :class:`RASAHead` or :class:`FoldedRASA`.
    Raises if the head's D differs from ``backbone.embed_dim``. Returns the backbone.

    Registered as the ``"rasa"`` feature transform of :func:`dinokit.backbones.load_backbone` (``rasa=PATH``)."""
    D = int(backbone.embed_dim)
    if isinstance(path_or_head, str | Path):
        op: RASAHead | FoldedRASA = load_rasa_head(path_or_head, embed_dim=D)
    else:
        op = path_or_head
    if op.embed_dim != D:
        raise ValueError(f"RASA head has D = {op.embed_dim} but backbone {getattr(backbone, 'name', '?')} has "
                         f"embed_dim {D}; use a head fitted on this backbone")
    backbone.feature_transform = RASATransform(op, mode)
    backbone.weights_info = {**getattr(backbone, "weights_info", {}),
                             "rasa": str(path_or_head) if isinstance(path_or_head, str | Path) else "in-memory",
                             "rasa_stages": op.n_stages}
    return backbone
