"""``Backbone``: a timm model behind the dense contract (features, attention, facets)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .features import AttentionMaps, DenseFeatures, Facets
from .registry import REGISTRY, UNSUPPORTED, ModelSpec, family_of_arch, supported_names

SIZE_POLICIES = ("error", "crop", "pad", "resize")

# name -> attach(backbone, path): the feature transforms ``load_backbone`` can install (``rasa=PATH`` uses "rasa").
# The methods layer fills it (``dinokit.methods.rasa`` registers "rasa" on import); backbones never import methods.
FEATURE_TRANSFORMS: dict[str, Callable[..., object]] = {}
FEATURE_TRANSFORM_MODULES = {"rasa": "dinokit.methods.rasa"}  # imported on demand when nothing is registered yet


def register_feature_transform(name: str, attach: Callable[..., object]) -> None:
    """Register ``attach(backbone, path)`` as the feature transform ``name`` of :func:`load_backbone`."""
    FEATURE_TRANSFORMS[name] = attach


def attach_feature_transform(name: str, backbone: Backbone, path) -> None:
    """Install the registered feature transform ``name`` (e.g. ``"rasa"``) from the file ``path`` on ``backbone``."""
    if name not in FEATURE_TRANSFORMS and name in FEATURE_TRANSFORM_MODULES:
        # by name, not a static import: the backbone layer must not depend on the methods layer above it;
        # importing the module registers its transform here
        importlib.import_module(FEATURE_TRANSFORM_MODULES[name])
    if name not in FEATURE_TRANSFORMS:
        raise ValueError(f"no feature transform {name!r} is registered (known: {sorted(FEATURE_TRANSFORMS)}); "
                         "import the module that registers it with register_feature_transform first")
    FEATURE_TRANSFORMS[name](backbone, path)


class AttentionUnavailableError(RuntimeError):
    """Raised when attention maps are asked of a backbone without attention (ResNet)."""


class _StopForward(Exception):
    pass


def resolve_name(name: str, tag: str | None = None) -> tuple[str, ModelSpec]:
    """Map a short name, a timm architecture or ``arch.tag`` to (short name, ModelSpec)."""
    if name in UNSUPPORTED:
        raise ValueError(f"{name!r} is not supported: {UNSUPPORTED[name]}. Supported names: "
                         f"{', '.join(supported_names())}")
    if name in REGISTRY:
        spec = REGISTRY[name]
        if tag is not None:
            spec = ModelSpec(spec.arch, tag, spec.family, spec.default_input_size, spec.kwargs, spec.random_only)
        return name, spec
    arch, _, arch_tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}: not a dinokit short name ({', '.join(supported_names())}) "
                         "nor a timm architecture (see timm.list_models())")
    family = family_of_arch(arch)
    size = {"dinov2": 518, "dinov3": 256}.get(family, 224)
    return name, ModelSpec(arch, tag or arch_tag or None, family, size)


def nearest_multiples(n: int, p: int) -> tuple[int, int]:
    """The multiples of p just below and above n (below is at least p)."""
    lo = max(p, (n // p) * p)
    return lo, lo + p if lo < n else lo


class Backbone(nn.Module):
    """A DINO-family (or ResNet) backbone with the dense-feature contract.

    ``forward_features(x)`` -> :class:`DenseFeatures`; ``attention(x, block)`` -> :class:`AttentionMaps`;
    ``facets(x, block)`` -> :class:`Facets`; ``intermediate_layers(x, indices)`` -> list of DenseFeatures.
    Inputs are normalised images (B, 3, H, W); H and W follow ``size_policy`` (see :meth:`prepare`).
    """

    def __init__(self, model: nn.Module, name: str, spec: ModelSpec, *, size_policy: str = "error",
                 pos_interp: str = "official", weights_info: dict | None = None, freeze_bn: bool = False):
        super().__init__()
        if size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy={size_policy!r}; choose one of {SIZE_POLICIES}")
        self.model = model
        self.name, self.arch, self.tag, self.family = name, spec.arch, spec.tag, spec.family
        self.size_policy = size_policy
        self.pos_interp = pos_interp
        self.weights_info = dict(weights_info or {})
        self.freeze_bn = freeze_bn
        self.kept_tensors: dict[str, torch.Tensor] = {}  # tensors dropped at load but kept for export (mask_token)
        self.model_kwargs: dict = {}
        # optional nn.Module mapping the final DenseFeatures to new ones (e.g. a RASA head); every consumer of
        # forward_features / forward sees its output
        self.feature_transform: nn.Module | None = None
        self.default_input_size = spec.default_input_size
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if self.is_vit:
            pe = model.patch_embed.patch_size
            self.patch_size = int(pe[0] if isinstance(pe, tuple | list) else pe)
            self.embed_dim = int(model.embed_dim)
            self.depth = len(model.blocks)
            self.num_heads = int(model.blocks[0].attn.num_heads)
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.num_registers = self.num_prefix_tokens - int(getattr(model, "cls_token", None) is not None)
        else:
            self.patch_size, self.embed_dim = 32, int(model.num_features)
            self.depth, self.num_heads, self.num_registers, self.num_prefix_tokens = 4, 0, 0, 0

    def train(self, mode: bool = True) -> Backbone:
        """``nn.Module.train``; with ``freeze_bn`` BatchNorm layers stay in eval mode (running stats frozen)."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def export(self, path, format: str = "dinokit"):
        """Write the weights: ``dinokit`` (safetensors, timm keys + metadata; reload with
        ``load_backbone(weights=path)``) or ``official`` (DINO / DINOv2 layout .pth). Returns the path."""
        from .weights import export

        return export(self, path, format)

    # ------------------------------------------------------------------ geometry
    @property
    def is_vit(self) -> bool:
        return hasattr(self.model, "blocks") and hasattr(self.model, "patch_embed")

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of H x W pixels after the size policy."""
        H2, W2 = self._policy_size(H, W)
        return H2 // self.patch_size, W2 // self.patch_size

    def _policy_size(self, H: int, W: int) -> tuple[int, int]:
        p = self.patch_size
        if self.size_policy != "resize" and (H < p or W < p):
            raise ValueError(f"input {H}x{W} is smaller than one {p}-px patch of {self.name}; "
                             "use a larger image or size_policy='resize'")
        if self.size_policy == "crop":
            return (H // p) * p, (W // p) * p
        if self.size_policy == "pad":
            return math.ceil(H / p) * p, math.ceil(W / p) * p
        if self.size_policy == "resize":
            return max(p, round(H / p) * p), max(p, round(W / p) * p)
        if H % p or W % p:
            h_opts, w_opts = nearest_multiples(H, p), nearest_multiples(W, p)
            raise ValueError(
                f"input {H}x{W} is not a multiple of the patch size {p} of {self.name}: use "
                f"{' or '.join(map(str, sorted(set(h_opts))))} by {' or '.join(map(str, sorted(set(w_opts))))}, "
                "or size_policy='crop' | 'pad' | 'resize'")
        return H, W

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the size policy to (B, 3, H, W); returns the tensor fed and the ``valid`` patch mask."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        H2, W2 = self._policy_size(H, W)
        p = self.patch_size
        if self.size_policy == "pad" and (H2, W2) == (H, W):
            return x, torch.ones(H // p, W // p, dtype=torch.bool, device=x.device)
        if (H2, W2) == (H, W):
            return x, None
        if self.size_policy == "crop":
            return x[..., :H2, :W2], None
        if self.size_policy == "pad":
            valid = torch.zeros(H2 // p, W2 // p, dtype=torch.bool, device=x.device)
            valid[: math.ceil(H / p), : math.ceil(W / p)] = True
            return F.pad(x, (0, W2 - W, 0, H2 - H)), valid
        return F.interpolate(x, size=(H2, W2), mode="bilinear", antialias=True, align_corners=False), None

    # ------------------------------------------------------------------ features
    def _split(self, tokens: torch.Tensor, grid: tuple[int, int], layer: int, normalized: bool,
               image_size: tuple[int, int], valid: torch.Tensor | None) -> DenseFeatures:
        P, R = self.num_prefix_tokens, self.num_registers
        B, _, D = tokens.shape
        patch = tokens[:, P:].reshape(B, grid[0], grid[1], D)
        cls = tokens[:, 0] if P > R else None
        regs = tokens[:, P - R:P] if R else tokens.new_zeros(B, 0, D)
        return DenseFeatures(patch, cls, regs, grid, self.patch_size, layer, normalized, image_size, valid)

    def forward_features(self, x: torch.Tensor) -> DenseFeatures:
        """Last-block dense features after the final norm (differentiable)."""
        x, valid = self.prepare(x)
        H, W = x.shape[-2:]
        if not self.is_vit:
            fm = self.model.forward_features(x)  # (B, C, h, w)
            B, C, h, w = fm.shape
            feats = DenseFeatures(fm.permute(0, 2, 3, 1), None, fm.new_zeros(B, 0, C), (h, w), H // h, 3, False,
                                  (H, W), valid)
            return feats if self.feature_transform is None else self.feature_transform(feats)
        tokens = self.model.forward_features(x)
        grid = (H // self.patch_size, W // self.patch_size)
        feats = self._split(tokens, grid, self.depth - 1, True, (H, W), valid)
        return feats if self.feature_transform is None else self.feature_transform(feats)

    def forward(self, x: torch.Tensor, attention_block: int | None = None):
        """Features, or (features, attention of ``attention_block``) from one pass."""
        if attention_block is None:
            return self.forward_features(x)
        captured: dict = {}
        handle = self._block_attn(attention_block).register_forward_pre_hook(
            lambda m, a, kw: captured.update(x=a[0], rope=kw.get("rope")), with_kwargs=True)
        try:
            feats = self.forward_features(x)
        finally:
            handle.remove()
        return feats, self._attention_from_input(captured, attention_block, feats.grid)

    def intermediate_layers(self, x: torch.Tensor, indices: int | list[int] = 1,
                            norm: bool = True) -> list[DenseFeatures]:
        """Outputs of several blocks (int n: the last n) as DenseFeatures, via timm forward_intermediates."""
        x, valid = self.prepare(x)
        H, W = x.shape[-2:]
        idx = self._indices(indices)
        if not self.is_vit:  # ResNet stages layer1..layer4 (timm feature index 0 is the stem)
            fms = self.model.forward_intermediates(x, indices=[i + 1 for i in idx], intermediates_only=True)
            out = []
            for i, fm in zip(idx, fms):
                B, C, h, w = fm.shape
                out.append(DenseFeatures(fm.permute(0, 2, 3, 1), None, fm.new_zeros(B, 0, C), (h, w),
                                         H // h, i, False, (H, W), valid))
            return out
        outs = self.model.forward_intermediates(x, indices=idx, return_prefix_tokens=True, norm=norm,
                                                output_fmt="NLC", intermediates_only=True, stop_early=True)
        grid = (H // self.patch_size, W // self.patch_size)
        res = []
        for i, (patch, prefix) in zip(idx, outs):
            tokens = torch.cat([prefix, patch], dim=1) if prefix is not None else patch
            res.append(self._split(tokens, grid, i, norm, (H, W), valid))
        return res

    def _indices(self, indices: int | list[int]) -> list[int]:
        if isinstance(indices, int):
            if not 1 <= indices <= self.depth:
                raise ValueError(f"indices={indices}: ask for 1 to {self.depth} last blocks of {self.name}")
            return list(range(self.depth - indices, self.depth))
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad:
            raise IndexError(f"block indices {bad} out of range for {self.name} with {self.depth} blocks")
        return [i % self.depth for i in indices]

    # ------------------------------------------------------------------ attention and facets
    def _block_attn(self, block: int) -> nn.Module:
        if not self.is_vit:
            raise AttentionUnavailableError(
                f"{self.name} has no attention; attention maps are defined for ViT backbones")
        if not -self.depth <= block < self.depth:
            raise IndexError(f"block {block} out of range for {self.name} with {self.depth} blocks")
        return self.model.blocks[block].attn

    def _run_until(self, x: torch.Tensor, block: int) -> tuple[dict, tuple[int, int]]:
        """Run the model up to ``blocks[block].attn`` and capture its input (and RoPE)."""
        x, _ = self.prepare(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        captured: dict = {}

        def hook(m, args, kwargs):
            captured.update(x=args[0], rope=kwargs.get("rope"))
            raise _StopForward

        handle = self._block_attn(block).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model.forward_features(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured, grid

    def qkv(self, attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
            apply_rope: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, N, d_h) in float32 from an attention module's own weights."""
        B, N, _ = x.shape
        nh = attn.num_heads
        x = x.float()
        if getattr(attn, "qkv", None) is not None:
            bias = attn.qkv.bias
            if getattr(attn, "q_bias", None) is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if getattr(attn, "qkv_bias_separate", False) and attn.qkv.bias is not None:
                    bias = bias + attn.qkv.bias
            qkv = F.linear(x, attn.qkv.weight.float(), None if bias is None else bias.float())
            q, k, v = qkv.reshape(B, N, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (getattr(attn, f"{n}_proj")(x).reshape(B, N, nh, -1).transpose(1, 2) for n in "qkv")
        q, k = attn.q_norm.float()(q), attn.k_norm.float()(k)
        if rope is not None and apply_rope:
            from timm.layers import apply_rot_embed_cat

            npt = attn.num_prefix_tokens
            half = getattr(attn, "rotate_half", False)
            rope = rope.float()
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        return q, k, v

    def _attention_from_input(self, captured: dict, block: int, grid: tuple[int, int]) -> AttentionMaps:
        attn = self._block_attn(block)
        with torch.autocast(device_type=captured["x"].device.type, enabled=False):
            q, k, _ = self.qkv(attn, captured["x"], captured["rope"])
            d = q.shape[-1]
            logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) / math.sqrt(d)  # (B, heads, N)
            a = logits.softmax(-1)
        P = self.num_prefix_tokens
        B, nh, _ = a.shape
        return AttentionMaps(cls=a[:, :, P:].reshape(B, nh, *grid), prefix=a[:, :, :P], block=block % self.depth,
                             grid=grid)

    @torch.no_grad()
    def attention(self, x: torch.Tensor, block: int = -1, full: bool = False) -> AttentionMaps:
        """CLS-query attention of ``block``: raw softmax probabilities, registers excluded from ``cls``."""
        if full:
            return self._attention_full(x, block)
        captured, grid = self._run_until(x, block)
        return self._attention_from_input(captured, block, grid)

    def _attention_full(self, x: torch.Tensor, block: int) -> AttentionMaps:
        """Path B: the block's own unfused softmax, captured at its ``attn_drop`` input."""
        attn = self._block_attn(block)
        captured: dict = {}
        old = attn.fused_attn
        x, _ = self.prepare(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

        def hook(m, args):
            captured["a"] = args[0]
            raise _StopForward

        handle = attn.attn_drop.register_forward_pre_hook(hook)
        try:
            attn.fused_attn = False
            with torch.autocast(device_type=x.device.type, enabled=False):
                self.model.forward_features(x.to(next(self.model.parameters()).dtype))
        except _StopForward:
            pass
        finally:
            attn.fused_attn = old
            handle.remove()
        a = captured["a"].float()
        P = self.num_prefix_tokens
        B, nh = a.shape[:2]
        return AttentionMaps(cls=a[:, :, 0, P:].reshape(B, nh, *grid), prefix=a[:, :, 0, :P],
                             block=block % self.depth, grid=grid, full=a)

    @torch.no_grad()
    def facets(self, x: torch.Tensor, block: int = -1, which: tuple[str, ...] = ("q", "k", "v"),
               rope: str = "pre") -> Facets:
        """q/k/v of ``block`` (B, heads, N, d_h), token order [CLS, registers, patches], plus the block's
        output ``tokens`` (B, N, D). ``rope='post'`` returns q, k as they enter attention (DINOv3)."""
        if rope not in ("pre", "post"):
            raise ValueError(f"rope={rope!r}; choose 'pre' or 'post'")
        attn = self._block_attn(block)
        blk = self.model.blocks[block]
        captured: dict = {}

        def hook_out(m, args, out):
            captured["tokens"] = out
            raise _StopForward

        h1 = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0], rope=kw.get("rope")),
                                            with_kwargs=True)
        h2 = blk.register_forward_hook(hook_out)
        xp, _ = self.prepare(x)
        grid = (xp.shape[-2] // self.patch_size, xp.shape[-1] // self.patch_size)
        try:
            self.model.forward_features(xp)
        except _StopForward:
            pass
        finally:
            h1.remove()
            h2.remove()
        q, k, v = self.qkv(attn, captured["x"], captured["rope"], apply_rope=rope == "post")
        out = {"q": q, "k": k, "v": v}
        f = Facets({n: out[n] for n in which}, grid=grid, num_prefix_tokens=self.num_prefix_tokens)
        f["tokens"] = captured["tokens"]
        return f

    def position_embedding(self, h: int, w: int) -> torch.Tensor | None:
        """(h*w, D) patch position embedding as used at grid (h, w); None for RoPE and ResNet."""
        if not self.is_vit or getattr(self.model, "pos_embed", None) is None:
            return None
        from .positions import interpolate_pos_embed

        return interpolate_pos_embed(self, h, w)


def load_backbone(name: str | None = None, weights: str = "pretrained", *, tag: str | None = None,
                  offline: bool | None = None, cache_dir: str | None = None, which: str = "teacher",
                  key: str | None = None, drop_registers: bool = False, trust_checkpoint: bool = False,
                  pos_interp: str = "official", size_policy: str = "error", drop_path_rate: float = 0.0,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  rasa: str | None = None, model_kwargs: dict | None = None, num_classes: int = 0,
                  freeze_bn: bool = False) -> Backbone:
    """Create a backbone by short name / timm name and load its weights.

    ``weights``: ``"pretrained"`` (the name's default tag, or ``tag``), a tag, a file path (official, timm or
    dinokit layout, possibly wrapped), or ``"random"``. ``name`` may be omitted for a dinokit-format file.
    ``which``/``key`` pick the weights inside training checkpoints; ``drop_registers`` loads register weights into
    a model without registers. ``num_classes`` > 0 keeps/creates a classifier head (ResNet ``fc``);
    ``freeze_bn`` keeps BatchNorm in eval mode while training. ``rasa``: optional path of a RASA head applied to
    every ``DenseFeatures`` this backbone yields. See docs/backbones.md for resolution and errors.
    """
    import json

    from . import resolve as R
    from . import weights as W

    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; choose 'teacher' or 'student'")
    meta: dict = {}
    if name is None:
        name = W.name_from_file(weights)
        meta = W.file_metadata(weights)
        if tag is None and meta.get("tag"):
            tag = meta["tag"]
        if model_kwargs is None and meta.get("model_kwargs"):
            model_kwargs = json.loads(meta["model_kwargs"]) or None
    if isinstance(weights, str) and weights not in ("pretrained", "random") and not W.is_file(weights):
        tag = weights  # weights given as a tag string
    name, spec = resolve_name(name, tag)
    if spec.random_only and weights != "random" and not W.is_file(weights):
        raise ValueError(f"{name!r} is a test-only architecture without published weights; "
                         "pass weights='random' or a local file")
    kwargs = dict(pretrained=False, **spec.kwargs, **(model_kwargs or {}))
    kwargs["num_classes"] = num_classes
    if spec.family != "resnet":
        kwargs.update(dynamic_img_size=True, drop_path_rate=drop_path_rate)
        if spec.family == "dinov3":
            kwargs["global_pool"] = "token"
    ckpt = R.read_checkpoint(name, spec, weights, tag=tag, offline=offline, cache_dir=cache_dir, which=which,
                             key=key, trust_checkpoint=trust_checkpoint)
    model = R.create_model(spec, kwargs, weights, ckpt, keep_img_size="img_size" in (model_kwargs or {}))
    info, kept = R.load_weights(model, name, spec, weights, ckpt=ckpt, drop_registers=drop_registers)
    bb = Backbone(model, name, spec, size_policy=size_policy, pos_interp=pos_interp, weights_info=info,
                  freeze_bn=freeze_bn)
    bb.kept_tensors = kept
    bb.model_kwargs = dict(model_kwargs or {})
    if spec.tag:
        try:
            cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
            if cfg is not None:
                bb.mean, bb.std = tuple(cfg.mean), tuple(cfg.std)
        except Exception:  # noqa: BLE001 - unknown tag: keep the architecture defaults
            pass
    from .positions import install_pos_interp

    install_pos_interp(bb)
    if rasa is not None:
        attach_feature_transform("rasa", bb, rasa)
    return bb.to(device=device, dtype=dtype) if (device or dtype) else bb
