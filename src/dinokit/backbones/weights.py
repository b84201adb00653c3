"""Weight resolution, safe reading, unwrapping, layout conversion, strict loading and export (docs/backbones.md).

Resolution of a tag: (1) the Hugging Face cache (lookup only), (2) the torch hub cache file of the official URL,
(3) ``huggingface_hub.hf_hub_download`` when online. Files are read with ``weights_only=True`` (allow-listed
container classes only), unwrapped (teacher/student/state_dict/model/module, ``module.``/``_orig_mod.``/
``backbone.`` prefixes, Lightning groups, chunked DINOv2 blocks), converted with timm's own converters and loaded
strictly. dinokit always creates models with ``pretrained=False``: timm's downloader never runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import dinokit_version
from .registry import SHAPES, ModelSpec

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
DINOKIT_FORMAT = "1"
# heads of DINO / iBOT / NeCo / RASA training checkpoints: never part of a backbone
HEAD_PREFIXES = ("dino_head.", "ibot_head.", "projection_head.", "rasa_head.")
# pickled classes allowed under weights_only=True: plain containers found in published checkpoints
# (argparse.Namespace of DINO v1 full checkpoints is always allowed; Lightning stores hyper-parameters as a plain
# dict, which needs nothing. Dict subclasses such as an old AttributeDict cannot be rebuilt under weights_only.)
_LAZY_SAFE_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype")


class WeightsUnavailableError(FileNotFoundError):
    """No weights could be found (offline) or downloaded; the message lists the ways out."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the architecture."""


class CheckpointReadError(ValueError):
    """A weights file could not be read (truncated, not a checkpoint, or holding unsafe pickled classes)."""


@dataclass
class Checkpoint:
    """A read and unwrapped checkpoint: timm-or-official keyed tensors plus where they came from."""

    state_dict: dict[str, torch.Tensor]
    info: dict
    metadata: dict = field(default_factory=dict)  # safetensors string metadata (dinokit format)


# ---------------------------------------------------------------------------------------------------- helpers
def is_file(weights: Any) -> bool:
    """Whether ``weights`` names a file (known suffix, a path separator, or an existing path) rather than a tag or
    ``random``."""
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (Path(weights).suffix in WEIGHT_SUFFIXES or "/" in weights
                                         or os.sep in weights or Path(weights).exists())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else on when ``DINOKIT_OFFLINE`` or ``HF_HUB_OFFLINE`` is truthy."""
    if offline is not None:
        return bool(offline)
    return _truthy(os.environ.get("DINOKIT_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def file_metadata(path: str | Path) -> dict:
    """String metadata of a safetensors file ({} for other files)."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
        raise CheckpointReadError(f"could not read {path} as safetensors ({e}); the file may be truncated or "
                                  "not a checkpoint: re-create or re-download it") from e


def name_from_file(weights: Any) -> str:
    """The short name stored in a dinokit-format safetensors file."""
    if not is_file(weights) or Path(weights).suffix != ".safetensors":
        raise ValueError("name is required unless weights is a dinokit-format .safetensors file "
                         f"(got weights={weights!r})")
    meta = file_metadata(weights)
    if "name" not in meta:
        raise ValueError(f"{weights} has no dinokit metadata; pass the backbone name explicitly")
    return meta["name"]


# ---------------------------------------------------------------------------------------------------- reading
def _import_global(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


def read_file(path: str | Path, trust_checkpoint: bool = False) -> tuple[Any, dict]:
    """Read a ``.safetensors`` or pickle checkpoint safely; returns (object, safetensors metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"weights file {path} is empty (0 bytes): re-create or re-download it")
    if path.suffix == ".safetensors":
        meta = file_metadata(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), meta
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"could not read {path} as safetensors ({e}); the file may be truncated") from e
    if trust_checkpoint:
        try:
            return torch.load(path, map_location="cpu", weights_only=False), {}
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"could not read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
                                      "the file may be truncated or not a checkpoint") from e
    allowed: list = [argparse.Namespace]
    for _ in range(len(_LAZY_SAFE_GLOBALS) + 1):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            cls = m.group(1) if m else None
            if cls in _LAZY_SAFE_GLOBALS:
                try:
                    allowed.append((_import_global(cls), cls))
                    continue
                except (ImportError, AttributeError):
                    pass
            if cls is None and "WeightsUnpickler error" in str(e):
                detail = str(e).split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0]
                raise CheckpointReadError(
                    f"{path} holds pickled objects that weights_only loading cannot rebuild ({detail}); if you trust "
                    "this file, pass trust_checkpoint=True (weights_only=False, which can run arbitrary code)") from e
            if cls is None:
                raise CheckpointReadError(f"could not read {path} as a torch checkpoint ({e}); the file may be "
                                          "truncated or not a checkpoint") from e
            raise CheckpointReadError(
                f"{path} contains the pickled class {cls}, which is not on dinokit's allow-list of safe container "
                "classes; if you trust this file, pass trust_checkpoint=True (it is then loaded with "
                "weights_only=False, which can run arbitrary code)") from e
        except Exception as e:  # noqa: BLE001 - zip/EOF/runtime errors of truncated or foreign files
            raise CheckpointReadError(f"could not read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
                                      "the file may be truncated or not a checkpoint") from e
    raise CheckpointReadError(f"could not read {path}: too many non-tensor classes")


# ---------------------------------------------------------------------------------------------------- unwrapping
def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in ("module.", "_orig_mod."):
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _group(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def unwrap(obj: Any, key: str | None = None, which: str = "teacher",
           where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Unwrap a checkpoint object to a flat state dict; returns (state dict, steps, dropped keys).

    See docs/backbones.md."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; choose 'teacher' or 'student'")
    steps: list[str] = []
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            top = list(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointMismatchError(f"{where}: key={key!r} not found; top-level keys: {top}")
        obj, _ = obj[key], steps.append(f"[{key!r}]")
    order = [which] + (["model_ema"] if which == "teacher" else []) + ["state_dict", "model", "module", "teacher",
                                                                      "student"]
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise CheckpointMismatchError(f"{where}: expected a state dict, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for k in order:
            if isinstance(obj.get(k), dict | nn.Module):
                obj, _ = obj[k], steps.append(f"[{k!r}]")
                break
        else:
            raise CheckpointMismatchError(
                f"{where}: no state dict found; top-level keys: {list(obj)[:20]}. Pass key=<the entry holding the "
                f"weights> (dinokit looks for {', '.join(order)})")
    sd = _strip_prefixes(obj)
    dropped: list[str] = []
    # Lightning modules: teacher. / student. / model. (model. counts as the student)
    groups = {g: _group(sd, g + ".") for g in ("teacher", "student", "model")}
    present = [g for g, v in groups.items() if v]
    if present:
        wanted = ["teacher"] if which == "teacher" else ["student", "model"]
        pick = next((g for g in wanted if g in present), None)
        if pick is None:
            pick = present[0]
            log.warning("%s: which=%r asked but the checkpoint only holds the %r group; using it", where, which, pick)
        elif len(present) > 1:
            log.warning("%s: checkpoint holds groups %s; using %r (which=%r)", where, present, pick, which)
        dropped += [k for k in sd if not k.startswith(pick + ".")]
        sd = _strip_prefixes(groups[pick])
        steps.append(f"group {pick}.")
    if any(k.startswith("backbone.") for k in sd):
        dropped += [k for k in sd if not k.startswith("backbone.")]
        sd = _strip_prefixes(_group(sd, "backbone."))
        steps.append("group backbone.")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
        steps.append("unchunked blocks.<c>.<i> -> blocks.<i>")
    return sd, steps, dropped


# ---------------------------------------------------------------------------------------------------- layouts
def detect_layout(sd: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """``dinokit`` | ``transformers`` | ``dinov3`` | ``dinov2`` | ``dino`` | ``torchvision`` | ``timm``."""
    if (metadata or {}).get("dinokit_format"):
        return "dinokit"
    keys = list(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.")) or ".encoder.layer." in k or ".embeddings.patch" in k
           for k in keys):
        return "transformers"
    if "storage_tokens" in sd or "rope_embed.periods" in sd or any(k.endswith(".bias_mask") for k in keys):
        return "dinov3"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in keys):
        return "dinov2"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "torchvision"
    if ("cls_token" in sd and "pos_embed" in sd and "blocks.0.attn.qkv.weight" in sd and "reg_token" not in sd
            and not any(".ls1." in k or ".gamma_1" in k for k in keys)):
        return "dino"
    return "timm"


def shape_summary(sd: dict[str, torch.Tensor]) -> tuple[str, str | None]:
    """("768-wide, 12 blocks, p 14, 4 registers", suggested short name or None) from a state dict's shapes."""
    if "layer4.0.conv1.weight" in sd:
        return "ResNet (layer1-layer4)", "resnet50" if "layer4.2.conv1.weight" in sd else None
    pw = sd.get("patch_embed.proj.weight")
    if pw is None:
        return "no patch embedding (not a ViT checkpoint)", None
    D, p = int(pw.shape[0]), int(pw.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    R = next((int(sd[k].shape[1]) for k in ("register_tokens", "reg_token", "storage_tokens") if k in sd), 0)
    swiglu = any(re.search(r"mlp\.(w12|w1|fc1_g)\.", k) for k in sd)
    regs = "no registers" if R == 0 else f"{R} register{'s' if R > 1 else ''}"
    text = f"{D}-wide, {depth} blocks, p {p}, {regs}" + (", SwiGLU MLP" if swiglu else "")
    matches = [n for n, s in SHAPES.items() if s[:4] == (D, depth, p, R) and (s[4] == swiglu or p == 14)]
    if len(matches) > 1:
        matches = [n for n in matches if SHAPES[n][4] == swiglu] or matches
    return text, (matches[0] if matches else None)


def _stored_grid(sd: dict[str, torch.Tensor]) -> int | None:
    """Side M of the stored absolute position table (1, [1 +] M², D), or None."""
    pe = sd.get("pos_embed")
    if pe is None or pe.ndim != 3:
        return None
    for n in (pe.shape[1], pe.shape[1] - 1):
        m = math.isqrt(n)
        if m > 0 and m * m == n:
            return m
    return None


def _split_heads(sd: dict, model: nn.Module) -> list[str]:
    """Drop training heads that the model has no room for; returns the dropped keys."""
    target = model.state_dict()
    dropped = []
    for k in list(sd):
        head = k.startswith(HEAD_PREFIXES)
        if k.startswith(("head.", "fc.")):
            head = k not in target or tuple(target[k].shape) != tuple(sd[k].shape)
        if head:
            dropped.append(k)
            del sd[k]
    return dropped


def convert(sd: dict[str, torch.Tensor], layout: str, model: nn.Module, *, drop_registers: bool = False,
            where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str], list[str], dict]:
    """Official layouts -> timm keys with timm's converters; returns (state dict, conversions, dropped, kept)."""
    sd = dict(sd)
    conversions: list[str] = []
    kept: dict[str, torch.Tensor] = {}
    dropped = _split_heads(sd, model)
    if layout == "transformers":
        raise CheckpointMismatchError(
            f"{where} is in the Hugging Face transformers layout (keys embeddings.*, encoder.layer.*) without its "
            "config.json: pass the folder holding config.json and model.safetensors, or its repo id")
    if "mask_token" in sd:
        kept["mask_token"] = sd["mask_token"]
    if drop_registers:
        for k in ("register_tokens",):
            if k in sd:
                dropped.append(k)
                del sd[k]
                conversions.append("drop_registers: register_tokens removed")
    if layout == "dinov2":
        from timm.models.vision_transformer import checkpoint_filter_fn

        if "mask_token" in sd:
            dropped.append("mask_token")
        reg = "register_tokens" in sd
        if reg != (getattr(model, "reg_token", None) is not None):
            raise _PreConversionMismatch(sd)
        sd = _run_converter(checkpoint_filter_fn, sd, model)
        conversions.append("timm.models.vision_transformer.checkpoint_filter_fn (DINOv2 official -> timm)")
        if reg:
            conversions.append("register_tokens -> reg_token; cls_token += pos_embed[:, 0]; pos_embed[:, 1:]")
    elif layout == "dinov3":
        from timm.models.eva import checkpoint_filter_fn

        has_qv = any(n.endswith("attn.q_bias") for n, _ in model.named_parameters())
        for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
            b = sd[k]
            mask = sd.get(k + "_mask")
            eff = b * mask if mask is not None else b
            q, kb, v = eff.chunk(3)
            if bool(kb.abs().max() > 0):
                raise CheckpointMismatchError(f"{where}: {k} has a non-zero, unmasked key bias that timm's DINOv3 "
                                              "architectures cannot hold")
            if not has_qv:
                if bool(q.abs().max() > 0 or v.abs().max() > 0):
                    raise CheckpointMismatchError(
                        f"{where}: {k} holds non-zero q/v biases that {type(model).__name__} without qkv bias cannot "
                        "hold (it would change the features): use the `_qkvb` architecture (the dinov3_* short "
                        "names do)")
                dropped.append(k)
                del sd[k]
            elif mask is not None:
                sd[k] = eff
        for k in list(sd):
            if k.endswith((".bias_mask", ".periods")) or k == "mask_token" or k.startswith("local_cls_norm"):
                dropped.append(k)
                del sd[k]
        sd = _run_converter(checkpoint_filter_fn, sd, model)
        conversions.append("timm.models.eva.checkpoint_filter_fn (DINOv3 official -> timm)")
    return sd, conversions, dropped, kept


class _PreConversionMismatch(Exception):
    """The raw checkpoint cannot be converted for this model (e.g. registers on one side only)."""

    def __init__(self, sd: dict, why: str = ""):
        super().__init__(why)
        self.sd, self.why = sd, why


def _run_converter(fn, sd: dict, model: nn.Module) -> dict:
    try:
        return fn(sd, model)
    except Exception as e:  # noqa: BLE001 - timm's converter fails on shapes it cannot resample
        raise _PreConversionMismatch(sd, f"{fn.__module__}.{fn.__name__} failed: {type(e).__name__}: {e}") from e


def _mismatch_text(where: str, name: str, arch: str, layout: str, raw: dict, missing: list, unexpected: list,
                   shapes: list) -> str:
    def lst(xs: list) -> str:
        return ", ".join(map(str, xs[:10])) + (f", … ({len(xs)} in all)" if len(xs) > 10 else "")

    lines = [f"{where} does not fit {name} ({arch}); detected layout: {layout}."]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {lst(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {lst(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches ({len(shapes)}): " + lst([f"{k}: checkpoint {a} vs model {b}"
                                                                 for k, a, b in shapes]))
    text, suggestion = shape_summary(raw)
    if suggestion:
        lines.append(f"The checkpoint's shapes: {text}: this is `{suggestion}`; pass that name.")
    else:
        lines.append(f"The checkpoint's shapes: {text}: no dinokit short name has these shapes; pass the timm "
                     "architecture name that matches.")
    if not shapes and any("reg_token" in k or "register_tokens" in k for k in unexpected):
        lines.append("To load register weights into a model without registers pass drop_registers=True.")
    return "\n".join(lines)


def load_into(model: nn.Module, ckpt: Checkpoint, name: str, spec: ModelSpec, *,
              drop_registers: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert and strictly load ``ckpt`` into ``model``; returns (weights_info, kept-aside tensors)."""
    where = ckpt.info.get("path") or ckpt.info.get("repo_id") or "checkpoint"
    raw = ckpt.state_dict
    layout = detect_layout(raw, ckpt.metadata)
    conv_layout = "timm" if layout in ("dinokit", "dino", "torchvision") else layout
    target = model.state_dict()
    try:
        sd, conversions, dropped, kept = convert(raw, conv_layout, model, drop_registers=drop_registers, where=where)
    except _PreConversionMismatch as e:  # compare the raw keys (minus the ones dropped by design)
        pre = {k: v for k, v in e.sd.items() if k != "mask_token"}
        missing = [k for k in target if k not in pre]
        unexpected = [k for k in pre if k not in target]
        shapes = [(k, tuple(pre[k].shape), tuple(target[k].shape)) for k in pre
                  if k in target and tuple(pre[k].shape) != tuple(target[k].shape)]
        text = _mismatch_text(where, name, spec.arch, layout, raw, missing, unexpected, shapes)
        raise CheckpointMismatchError(text + (f"\n({e.why})" if e.why else "")) from None
    if layout == "dinokit" and "mask_token" in sd:
        dropped.append("mask_token")
        del sd["mask_token"]
    fresh = [k for k in target if k not in sd and k.startswith(("head.", "fc."))]  # a new classifier head
    if fresh:
        log.warning("%s: %s not in the checkpoint: freshly initialised", where, _summarise(fresh))
    missing = [k for k in target if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in target]
    shapes = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in sd
              if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    pw = raw.get("patch_embed.proj.weight")
    if pw is not None and "patch_embed.proj.weight" in target and pw.shape != target["patch_embed.proj.weight"].shape:
        shapes.append(("patch_embed.proj.weight", tuple(pw.shape), tuple(target["patch_embed.proj.weight"].shape)))
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_mismatch_text(where, name, spec.arch, layout, raw, missing, unexpected, shapes))
    model.load_state_dict(sd, strict=False)
    if dropped:
        log.info("%s: dropped by design (not part of the backbone): %s", where, _summarise(dropped))
    info = dict(ckpt.info)
    info.update(layout=layout, conversions=ckpt.info.get("unwrap", []) + conversions, dropped=_summarise(dropped),
                dinokit_version=dinokit_version())
    info.pop("unwrap", None)
    if ckpt.info.get("hf_config"):  # transformers config: heads, eps, act, RoPE base are in no tensor shape
        from .hf import check_architecture

        check_architecture(ckpt.info["hf_config"], model, where, spec.arch)
    return info, kept


def _summarise(keys: list[str]) -> list[str]:
    """Group dropped keys by their first component: ``head.* (12 tensors)``."""
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return [g if n == 1 and g in keys else f"{g}.* ({n} tensors)" for g, n in groups.items()]


# ---------------------------------------------------------------------------------------------------- export
def export(bb, path: str | Path, format: str = "dinokit") -> Path:
    """Write ``bb``'s weights: ``dinokit`` (safetensors, timm keys + metadata) or ``official`` (DINO / DINOv2)."""
    from ..io import atomic_path

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in bb.model.state_dict().items()}
    kept = getattr(bb, "kept_tensors", {}) or {}
    if format == "dinokit":
        from safetensors.torch import save_file

        if "mask_token" in kept:
            sd["mask_token"] = kept["mask_token"].detach().cpu().contiguous().clone()
        meta = {"dinokit_format": DINOKIT_FORMAT, "name": bb.name, "arch": bb.arch, "tag": bb.tag or "",
                "family": bb.family, "patch_size": str(bb.patch_size), "num_registers": str(bb.num_registers),
                "pos_interp": bb.pos_interp, "source": str(bb.weights_info.get("source", "")),
                "dinokit_version": dinokit_version(), "model_kwargs": json.dumps(getattr(bb, "model_kwargs", {}) or {})}
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        return path
    if format != "official":
        raise ValueError(f"format={format!r}; choose 'dinokit' or 'official'")
    if bb.family == "dinov3":
        raise ValueError(f"{bb.name}: the official export is defined for DINO and DINOv2 only; DINOv3 has no "
                         "converter back to the official layout here, use format='dinokit'")
    if bb.family not in ("dino", "dinov2"):
        raise ValueError(f"{bb.name}: the official export is defined for DINO and DINOv2 only; use format='dinokit'")
    if bb.family == "dinov2":
        D = bb.embed_dim
        sd["mask_token"] = kept.get("mask_token", torch.zeros(1, D)).detach().cpu().clone()
        if any(re.search(r"mlp\.fc1_g\.", k) for k in sd):
            raise ValueError(f"{bb.name}: unpacked SwiGLU MLP has no official DINOv2 key mapping")
        from timm.layers import GluMlp

        if isinstance(bb.model.blocks[0].mlp, GluMlp):  # ViT-g: packed SwiGLU fc1/fc2 <-> official w12/w3
            sd = {re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k)): v for k, v in sd.items()}
        if "reg_token" in sd:
            sd["register_tokens"] = sd.pop("reg_token")
            pe = sd["pos_embed"]
            sd["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path
