"""Hugging Face ``transformers`` DINOv2 / DINOv2-with-registers / DINOv3 ViT checkpoints.

Accepted as ``weights``: a folder holding ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``), that folder's weights file, or a repo id such as
``facebook/dinov2-small`` found in the local Hugging Face cache (downloaded into the cache only when online).

The tensors are renamed to the official DINOv2 / DINOv3 layouts (q, k, v concatenated into ``attn.qkv``;
``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``; ``embeddings.position_embeddings`` -> ``pos_embed``;
``register_tokens`` -> ``register_tokens`` (DINOv2) / ``storage_tokens`` (DINOv3)), after which the usual path of
official files applies: timm's own converters, strict loading, ``mask_token`` kept aside (DINOv2) or dropped
(DINOv3), the model built at the stored position grid. Position interpolation at other input sizes is dinokit's own
rule (``pos_interp``), not transformers' ``interpolate_pos_encoding``. Reading needs no ``transformers`` install:
only ``config.json`` (JSON) and the weight files.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# transformers model_type -> dinokit family
MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3"}
# transformers' defaults: config.json files written by older versions omit fields left at their default
_DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14,
                   image_size=224, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False,
                   num_register_tokens=0),
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                  patch_size=14, image_size=224, layer_norm_eps=1e-6, hidden_act="gelu",
                                  qkv_bias=True, use_swiglu_ffn=False, num_register_tokens=4),
    "dinov3_vit": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=16, image_size=224, layer_norm_eps=1e-5, hidden_act="gelu", rope_theta=100.0,
                       query_bias=True, key_bias=False, value_bias=True, use_gated_mlp=False,
                       num_register_tokens=0),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


# ---------------------------------------------------------------------------------------------------- config
def read_config(path: str | Path) -> dict:
    """``config.json`` with transformers' defaults filled in; {} when the file is not a transformers DINO ViT config
    (a timm ``config.json`` has no ``model_type``). Raises ValueError for a transformers model this module cannot
    map (e.g. ``dinov3_convnext``)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {path} as JSON ({e}); re-create or re-download it") from e
    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if mt is None:
        return {}
    if mt not in MODEL_TYPES:
        raise ValueError(f"{path}: transformers model_type {mt!r} is not supported; dinokit reads "
                         f"{', '.join(MODEL_TYPES)} (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel)")
    return {**_DEFAULTS[mt], **raw}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))


def summary(cfg: dict) -> dict:
    """The fields of a transformers config that shape the model, as recorded in ``weights_info['hf_config']``."""
    keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
            "image_size", "num_register_tokens", "layer_norm_eps", "hidden_act", "mlp_ratio", "intermediate_size",
            "use_swiglu_ffn", "use_gated_mlp", "rope_theta", "query_bias", "key_bias", "value_bias", "qkv_bias")
    return {k: cfg[k] for k in keys if k in cfg}


# ---------------------------------------------------------------------------------------------------- mapping
def _strip_prefix(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Keep the base model (``<prefix>embeddings.cls_token`` ...), dropping heads such as ``classifier.*``."""
    hits = [k[: -len("embeddings.cls_token")] for k in sd if k.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        from .weights import CheckpointMismatchError

        raise CheckpointMismatchError(f"{where}: expected one embeddings.cls_token in a transformers DINO "
                                      f"checkpoint, found {len(hits)}; keys: {list(sd)[:10]}")
    p = hits[0]
    dropped = [k for k in sd if not k.startswith(p)]
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, dropped, p


def _qkv(parts: dict[str, torch.Tensor], i: int, where: str) -> dict[str, torch.Tensor]:
    """Concatenate q, k, v (each (D', D) weight, optional (D',) bias) into ``blocks.i.attn.qkv``. A projection
    without a bias gets zeros (the same function), so the official layout always has ``qkv.bias``; a zero key bias is
    what timm's DINOv3 architectures assume, a non-zero one is refused by the DINOv3 conversion."""
    from .weights import CheckpointMismatchError

    missing = [n for n in "qkv" if f"{n}.weight" not in parts]
    if missing:
        raise CheckpointMismatchError(f"{where}: layer {i} has no {', '.join(missing)} projection weight")
    w = [parts[f"{n}.weight"] for n in "qkv"]
    b = [parts.get(f"{n}.bias", wn.new_zeros(wn.shape[0])) for n, wn in zip("qkv", w)]
    return {f"blocks.{i}.attn.qkv.weight": torch.cat(w), f"blocks.{i}.attn.qkv.bias": torch.cat(b)}


_ATTN = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
         "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj"}
_SCALE = {"layer_scale1": "ls1.gamma", "layer_scale2": "ls2.gamma"}
# per MLP kind: transformers module names (legacy and current) -> official names
_MLP = {
    "dinov2": {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
               "mlp.down_proj": "mlp.w3"},  # current SwiGLU names: gate_proj/up_proj are packed into w12 below
    "dinov3_gated": {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"},
    "dinov3": {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"},
}
_LAYER = re.compile(r"^(?:encoder\.|model\.)?layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_FAMILY_NAME = {"dinov2": "DINOv2", "dinov3": "DINOv3"}


def to_official(sd: dict[str, torch.Tensor], cfg: dict, where: str = "checkpoint"
                ) -> tuple[dict[str, torch.Tensor], str, list[str], list[str]]:
    """transformers keys (legacy ``attention.attention.query`` or current ``attention.q_proj`` names) -> the
    official DINOv2 / DINOv3 layout.

    Returns (state dict, family ``dinov2`` | ``dinov3``, conversion steps, dropped keys). Every key is mapped,
    dropped by design (heads outside the base model, RoPE frequencies) or reported: an unknown key raises
    ``CheckpointMismatchError``.
    """
    from .weights import CheckpointMismatchError

    family = MODEL_TYPES[cfg["model_type"]]
    sd, dropped, prefix = _strip_prefix(sd, where)
    steps = [f"transformers {cfg['model_type']} -> official {_FAMILY_NAME[family]} keys (q, k, v -> attn.qkv; "
             "layer_scale{1,2}.lambda1 -> ls{1,2}.gamma; "
             + ("position_embeddings -> pos_embed)" if family == "dinov2" else "register_tokens -> storage_tokens)")]
    if prefix:
        steps.insert(0, f"base model {prefix!r} of {cfg.get('architectures') or cfg['model_type']}")
    mlp = _MLP["dinov2" if family == "dinov2" else "dinov3_gated" if cfg.get("use_gated_mlp") else "dinov3"]
    out: dict[str, torch.Tensor] = {}
    attn: dict[int, dict[str, torch.Tensor]] = {}
    glu: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        m = _LAYER.match(k)
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)  # official (1, D); DINOv3 transformers stores (1, 1, D)
        elif k == "embeddings.register_tokens":
            out["register_tokens" if family == "dinov2" else "storage_tokens"] = v
        elif k == "embeddings.position_embeddings" and family == "dinov2":
            out["pos_embed"] = v
        elif re.match(r"^embeddings\.patch_embeddings\.(projection\.)?(weight|bias)$", k):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif re.match(r"^(layernorm|norm)\.(weight|bias)$", k):
            out["norm." + k.split(".", 1)[1]] = v
        elif k.startswith("rope_embeddings."):
            dropped.append(prefix + k)  # RoPE frequencies: recomputed from rope_theta by the model
        elif m is None:
            unknown.append(prefix + k)
        else:
            i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
            if leaf == "lambda1" and mod in _SCALE:
                out[f"blocks.{i}.{_SCALE[mod]}"] = v
            elif mod in _ATTN:
                attn.setdefault(i, {})[f"{_ATTN[mod]}.{leaf}"] = v
            elif mod in _BLOCK:
                out[f"blocks.{i}.{_BLOCK[mod]}.{leaf}"] = v
            elif family == "dinov2" and mod in ("mlp.gate_proj", "mlp.up_proj"):
                glu.setdefault(i, {})[f"{mod}.{leaf}"] = v
            elif mod in mlp:
                out[f"blocks.{i}.{mlp[mod]}.{leaf}"] = v
            else:
                unknown.append(prefix + k)
    if unknown:
        raise CheckpointMismatchError(f"{where}: transformers keys with no {_FAMILY_NAME[family]} mapping "
                                      f"({len(unknown)}): {', '.join(unknown[:10])}; is config.json's model_type "
                                      f"{cfg['model_type']!r} right for these weights?")
    for i, parts in sorted(attn.items()):
        out.update(_qkv(parts, i, where))
    absent = sorted({n for parts in attn.values() for n in "qkv" if f"{n}.bias" not in parts})
    if absent:
        steps.append(f"no {'/'.join(absent)} projection bias: zeros in attn.qkv.bias")
    for i, parts in sorted(glu.items()):  # SwiGLU gate/up -> the packed official w12 = [gate; up]
        for leaf in ("weight", "bias"):
            if f"mlp.gate_proj.{leaf}" in parts and f"mlp.up_proj.{leaf}" in parts:
                out[f"blocks.{i}.mlp.w12.{leaf}"] = torch.cat([parts[f"mlp.gate_proj.{leaf}"],
                                                               parts[f"mlp.up_proj.{leaf}"]])
    if family == "dinov3" and "storage_tokens" not in out:  # keeps the layout recognisable as DINOv3
        out["storage_tokens"] = out["cls_token"].new_zeros(1, 0, out["cls_token"].shape[-1])
    return out, family, steps, dropped


# ---------------------------------------------------------------------------------------------------- checks
def _depth(sd: dict[str, torch.Tensor]) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)


def check_config(cfg: dict, sd: dict[str, torch.Tensor], where: str) -> None:
    """``config.json`` against the official-layout tensors of the same folder; raises ValueError naming the field."""
    pw = sd.get("patch_embed.proj.weight")
    if pw is None or pw.ndim != 4:
        raise ValueError(f"{where}: no 4-D patch embedding weight; not a {cfg['model_type']} ViT checkpoint")
    reg = sd.get("register_tokens", sd.get("storage_tokens"))
    R = 0 if reg is None else int(reg.shape[1])
    found = {"hidden_size": int(pw.shape[0]), "num_hidden_layers": _depth(sd),
             "patch_size": (int(pw.shape[-2]), int(pw.shape[-1])), "num_register_tokens": R}
    want = {"hidden_size": int(cfg["hidden_size"]), "num_hidden_layers": int(cfg["num_hidden_layers"]),
            "patch_size": _pair(cfg["patch_size"]), "num_register_tokens": int(cfg.get("num_register_tokens", 0))}
    if "pos_embed" in sd:
        gh, gw = (a // b for a, b in zip(_pair(cfg["image_size"]), _pair(cfg["patch_size"])))
        found["image_size"] = int(sd["pos_embed"].shape[1]) - 1
        want["image_size"] = gh * gw
    for f, v in want.items():
        if found[f] != v:
            shown = (f"{cfg['image_size']} ({v} positions)", f"{found[f]} positions") if f == "image_size" else (
                v, found[f])
            raise ValueError(f"{where}: config.json {f}={shown[0]} but the weights hold {shown[1]}; the folder's "
                             "config.json and weights do not belong together: re-download or re-export it")
    if want["hidden_size"] % int(cfg["num_attention_heads"]):
        raise ValueError(f"{where}: config.json num_attention_heads={cfg['num_attention_heads']} does not divide "
                         f"hidden_size={want['hidden_size']}")


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    if isinstance(act, nn.SiLU):
        return "silu"
    return type(act).__name__


def check_architecture(cfg: dict, model: nn.Module, where: str = "checkpoint", arch: str = "") -> None:
    """A transformers config against a created timm ViT; raises ValueError naming the first field that differs.

    Compared: hidden_size, num_hidden_layers, num_attention_heads, patch_size, num_register_tokens, layer_norm_eps,
    hidden_act (plain MLP), rope_theta (DINOv3) and, for a learned position table, image_size against the
    model's ``img_size`` (dinokit builds the model at the stored grid, so a difference means ``img_size`` was forced).
    """
    arch = arch or type(model).__name__
    reg = getattr(model, "reg_token", None)
    blk = model.blocks[0]
    got: dict[str, Any] = {
        "hidden_size": int(model.embed_dim), "num_hidden_layers": len(model.blocks),
        "num_attention_heads": int(blk.attn.num_heads), "patch_size": tuple(model.patch_embed.patch_size),
        "num_register_tokens": 0 if reg is None else int(reg.shape[1]),
        "layer_norm_eps": float(model.norm.eps) if hasattr(model.norm, "eps") else None,
    }
    want: dict[str, Any] = {
        "hidden_size": int(cfg["hidden_size"]), "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_attention_heads": int(cfg["num_attention_heads"]), "patch_size": _pair(cfg["patch_size"]),
        "num_register_tokens": int(cfg.get("num_register_tokens", 0)),
        "layer_norm_eps": float(cfg["layer_norm_eps"]),
    }
    gated = cfg.get("use_swiglu_ffn") or cfg.get("use_gated_mlp")
    if not gated and hasattr(blk.mlp, "act"):
        got["hidden_act"], want["hidden_act"] = _act_name(blk.mlp.act), cfg["hidden_act"]
    rope = getattr(model, "rope", None)
    if MODEL_TYPES[cfg["model_type"]] == "dinov3" and getattr(rope, "temperature", None) is not None:
        got["rope_theta"], want["rope_theta"] = float(rope.temperature), float(cfg["rope_theta"])
    if getattr(model, "pos_embed", None) is not None:
        got["image_size"], want["image_size"] = tuple(model.patch_embed.img_size), _pair(cfg["image_size"])
    for f, v in want.items():
        g = got[f]
        same = abs(g - v) <= 1e-12 * max(1.0, abs(v)) if isinstance(v, float) and g is not None else g == v
        if not same:
            raise ValueError(f"{where}: transformers config {f}={cfg[f]!r} does not match the architecture {arch} "
                             f"({f} {g!r}); pass the dinokit name / timm architecture with the same {f}")


# ---------------------------------------------------------------------------------------------------- resolution
def _weights_in(folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def is_repo_id(weights: Any) -> bool:
    """``owner/name`` that is not a local path (nor under an existing local folder) and has no weights suffix."""
    from .weights import WEIGHT_SUFFIXES

    if not isinstance(weights, str) or not _REPO_ID.match(weights):
        return False
    p = Path(weights)
    return not p.exists() and not p.parent.is_dir() and p.suffix not in WEIGHT_SUFFIXES


def _shard_names(index: Path) -> list[str]:
    from .weights import CheckpointReadError

    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointReadError(f"could not read {index} as a safetensors index ({e}); re-create or "
                                  "re-download it") from e


def _unavailable(repo: str, cache: str, why: str) -> str:
    return (f"weights {repo!r} (read as a Hugging Face repo id: it is not a local path) are not available: {why}.\n"
            f"Looked in: the Hugging Face cache {cache} for repo {repo} (files {CONFIG} and one of "
            f"{', '.join(WEIGHT_FILES)}).\n"
            "Ways out:\n"
            f"  1. fill the cache once with network access: `hf download {repo}` (older huggingface_hub: "
            f"`huggingface-cli download {repo}`), or point HF_HOME / cache_dir at a directory that has it;\n"
            "  2. pass the local folder holding config.json and model.safetensors: weights=\"/path/to/folder\" "
            "(or fix the path, if a local folder was meant);\n"
            "  3. ask for an explicitly random initialisation: weights=\"random\".")


def resolve_repo(repo: str, *, offline: bool | None = None, cache_dir: str | None = None) -> tuple[Path, Path, dict]:
    """(config path, weights path, info) of a repo id: the Hugging Face cache (a lookup, no request), then, when
    online, ``hf_hub_download`` into the cache. Raises ``WeightsUnavailableError`` naming where it looked."""
    from huggingface_hub import try_to_load_from_cache

    from .resolve import _hf_cache_dir
    from .weights import WeightsUnavailableError, is_offline

    online = not is_offline(offline)
    errors: list[str] = []
    downloaded: list[str] = []

    def cached(fname: str) -> str | None:
        try:
            hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an id the hub client refuses is simply not in the cache
            return None
        return hit if isinstance(hit, str) and Path(hit).is_file() else None

    def fetch(fname: str) -> str | None:
        hit = cached(fname)
        if hit is not None or not online:
            return hit
        from huggingface_hub import hf_hub_download

        try:
            hit = hf_hub_download(repo, fname, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - every failure ends in the same clear error
            errors.append(f"{fname}: {type(e).__name__}: {e}")
            return None
        downloaded.append(fname)
        return hit

    def fail(what: str) -> WeightsUnavailableError:
        why = f"the download failed ({'; '.join(errors)})" if online else f"offline mode and {what}"
        return WeightsUnavailableError(_unavailable(repo, _hf_cache_dir(cache_dir), why))

    before = [f for f in (CONFIG, *WEIGHT_FILES) if cached(f)]
    cfg = fetch(CONFIG)
    if cfg is None:
        raise fail(f"only {', '.join(before)} in the cache" if before else "nothing found in the cache")
    wpath = next((hit for f in WEIGHT_FILES if (hit := cached(f))), None)
    for fname in WEIGHT_FILES if wpath is None and online else ():
        if (wpath := fetch(fname)) is not None:
            break
    if wpath is None:
        raise fail(f"{CONFIG} but none of {', '.join(WEIGHT_FILES)} in the cache")
    wname = Path(wpath).name
    if wname.endswith(".index.json"):
        for shard in _shard_names(Path(wpath)):
            if fetch(shard) is None:
                raise fail(f"the shard {shard} of {wname} missing from the cache")
    return Path(cfg), Path(wpath), {"source": "hf-download" if downloaded else "hf-cache", "repo_id": repo,
                                    "file": wname, "revision": Path(wpath).parent.name, "path": str(wpath)}


def _read_tensors(wpath: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    """Flat state dict of a weights file, or of every shard named by a ``model.safetensors.index.json``."""
    from .weights import CheckpointMismatchError, CheckpointReadError, read_file

    files = [wpath.parent / f for f in _shard_names(wpath)] if wpath.name.endswith(".index.json") else [wpath]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointReadError(f"{wpath} names shard files that are missing: {', '.join(missing[:5])}; copy or "
                                  "download the whole folder")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        obj, _ = read_file(f, trust_checkpoint=trust_checkpoint)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointMismatchError(f"{f}: expected a flat state dict of tensors (a transformers weights file)")
        sd.update(obj)
    return sd


def _transformers_config(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and bool(read_config(folder / CONFIG))


def hf_location(weights: Any) -> tuple[str, Path | str] | None:
    """Where transformers weights are: ``("folder", path)`` for a folder (any folder: a timm folder is read as the
    weights file it holds) or a weights file beside a transformers ``config.json``, ``("repo", id)`` for a repo id,
    None for anything else (tags, other files: the usual resolution handles them)."""
    if not isinstance(weights, str | Path) or weights in ("pretrained", "random"):
        return None
    p = Path(weights)
    if p.is_dir():
        return "folder", p
    if p.is_file():
        return ("folder", p) if p.name in WEIGHT_FILES and _transformers_config(p.parent) else None
    return ("repo", str(weights)) if is_repo_id(weights) else None


def read_transformers(name: str, spec, weights: Any, *, offline: bool | None = None, cache_dir: str | None = None,
                      which: str = "teacher", key: str | None = None, trust_checkpoint: bool = False):
    """A :class:`~dinokit.backbones.weights.Checkpoint` in the official DINOv2 / DINOv3 layout for a transformers
    folder, weights file or repo id; None when ``weights`` is none of these (the caller goes on as usual).

    A folder or cached repo without a transformers ``config.json`` (a timm repo, a folder of one checkpoint) is read
    as the plain weights file it holds, with the usual layout detection.
    """
    from .resolve import read_checkpoint
    from .weights import Checkpoint, _summarise, sha256

    loc = hf_location(weights)
    if loc is None:
        return None
    kind, where = loc
    if kind == "repo":
        cfg_path, wpath, info = resolve_repo(str(where), offline=offline, cache_dir=cache_dir)
    else:
        p = Path(where)
        folder = p if p.is_dir() else p.parent
        wpath = p if p.is_file() else _weights_in(folder)
        if wpath is None:
            raise FileNotFoundError(f"{folder} is a folder without any of {', '.join(WEIGHT_FILES)}; pass a "
                                    "transformers model folder (config.json + model.safetensors) or a weights file")
        cfg_path = folder / CONFIG
        info = {"source": "file", "path": str(wpath), "folder": str(folder)}
    cfg = read_config(cfg_path) if cfg_path.is_file() else {}
    if not cfg:  # not a transformers folder: the weights file the usual way (no recursion: not a folder any more)
        if wpath.name.endswith(".index.json"):
            raise ValueError(f"{wpath}: a sharded checkpoint is read only from a transformers folder with its "
                             f"{CONFIG} (model_type one of {', '.join(MODEL_TYPES)})")
        ck = read_checkpoint(name, spec, str(wpath), offline=offline, cache_dir=cache_dir, which=which, key=key,
                             trust_checkpoint=trust_checkpoint)
        if kind == "repo" and ck is not None:
            ck.info.update(info)
        return ck
    if not wpath.name.endswith(".index.json") and info["source"] == "file":
        info["sha256"] = sha256(wpath)
    place = str(wpath)
    sd, family, steps, dropped = to_official(_read_tensors(wpath, trust_checkpoint), cfg, where=place)
    check_config(cfg, sd, place)
    if dropped:
        log.info("%s: dropped (not part of the backbone): %s", place, _summarise(dropped))
    info.update(which=which, unwrap=steps, hf_model_type=cfg["model_type"], hf_config=summary(cfg),
                interpolation=("dinokit's pos_interp rule (Backbone.pos_interp), not transformers' "
                               "interpolate_pos_encoding" if family == "dinov2" else
                               "RoPE computed for each input grid (no position table)"))
    ck = Checkpoint(sd, info, {})
    ck.info["dropped_unwrap"] = _summarise(dropped)
    return ck
