"""RepAlignLoss: a perceptual loss from a frozen teacher's intermediate activations.

Spec: docs/methods/repalign.md (upstream: BurguerJohn/RepAlignLoss, MIT; formulas only, no code copied).

``loss = RepAlignLoss(teacher, normalize)``; ``loss(output, target)`` runs ``teacher(normalize(target))`` under
``no_grad`` and ``teacher(normalize(output))`` with grad, hooks the selected modules and compares the activations of
each hooked call:

- ``mode="group"`` (default; the first upstream version, the "localized pair" loss): an activation is flattened to
  (B, C, L) - conv maps (B, C, H, W) -> (B, C, H*W), tokens (B, N, D) unchanged, **2-D (B, D) -> (B, 1, D)** (so a
  pooled vector is grouped along its features instead of degenerating to sign matching) - zero-padded to a multiple of
  ``group_size`` g, split into groups of g consecutive elements, each group L2-normalised (``v / max(|v|, eps)``) and
  compared with ``1/2 |x^ - y^|^2``; for non-zero groups that is ``1 - cos``. Default reduction: the mean over all
  groups of all terms (``"global"``), i.e. the mean of (1 - cos) over groups; ``"per_layer"`` averages each term's mean.
- ``mode="whole"`` (the current upstream version): per sample and term, ``mean((x/|x| - y/|y|)^2)`` over the
  activation (norms + 1e-8, detached by default), summed over terms and divided by ``n * B``.

Execution is streamed: the target activations are converted at once to their comparison form (normalised groups,
optionally bf16) and the raw ones are dropped; each student term is computed in the hook as its activation arrives and
its target reference is released, so only one (pre-normalised) copy of the target activations is ever held.
Hooks exist only during a call (registered and removed in ``try/finally``), so instances sharing a teacher, or later
teacher forwards, never see each other's state. The teacher is frozen, kept in eval mode and is not part of
``parameters()`` / ``state_dict()``, but follows ``.to()`` / ``.half()``.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RepAlignLoss", "TeacherInput", "repalign_terms", "depth_weights", "group_view", "name_matches", "MODES",
           "LAYER_REDUCTIONS"]

MODES = ("group", "whole")
LAYER_REDUCTIONS = ("global", "per_layer")
_WHOLE_EPS = 1e-8
_BUSY_TEACHERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # teachers inside a RepAlignLoss call


class _StopForward(Exception):
    """Private signal raised by the last student hook to skip the unused tail of the teacher."""


# ---------------------------------------------------------------------------------------------------- pure helpers
def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32, or fp64 when the activation is fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: Tensor) -> Tensor:
    """Activation -> (B, C, L): dims 0 and 1 kept, the rest merged; 2-D (B, D) -> (B, 1, D)."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def group_view(t: Tensor, group_size: int, dtype: torch.dtype | None = None) -> Tensor:
    """Activation (B, C, ...) or (B, D) -> zero-padded groups (B, C, ceil(L/g), g) in ``dtype``."""
    f = _flat(t)
    if dtype is not None:
        f = f.to(dtype)
    pad = (-f.shape[-1]) % group_size
    if pad:
        f = F.pad(f, (0, pad))
    return f.reshape(f.shape[0], f.shape[1], -1, group_size)


def num_groups(shape: Sequence[int], group_size: int) -> int:
    """G_l = B * C * L' / g for an activation of ``shape``."""
    if len(shape) == 2:
        b, c, length = shape[0], 1, shape[1]
    else:
        b, c, length = shape[0], shape[1], math.prod(shape[2:])
    return b * c * (-(-length // group_size))


def _inv_norm(v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(|v|^2, 1 / max(|v|, eps)) over the last dim (square-sum: much faster than vector_norm on tiny dims)."""
    n2 = v.square().sum(-1, keepdim=True)
    return n2, n2.clamp_min(eps * eps).rsqrt()


def _unit_groups(t: Tensor, group_size: int, eps: float) -> Tensor:
    """Normalised groups v / max(|v|, eps) (B, C, L'/g, g) in the compute dtype (no grad needed)."""
    v = group_view(t, group_size, _compute_dtype(t))
    return v * _inv_norm(v, eps)[1]


def _unit_rows(t: Tensor) -> Tensor:
    """Whole-mode target y / (|y| + 1e-8) per sample, as (B, N) in the compute dtype."""
    v = t.reshape(t.shape[0], -1).to(_compute_dtype(t))
    return v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + _WHOLE_EPS)


def _group_fwd_kernel(v: Tensor, y_hat: Tensor, eps: float) -> Tensor:
    """S = sum over groups of 1/2 |v^ - y^|^2 (v, y_hat: (B, C, G, g))."""
    return 0.5 * (v * _inv_norm(v, eps)[1] - y_hat).square().sum()


def _group_bwd_kernel(v: Tensor, y_hat: Tensor, eps: float, grad_s: Tensor) -> Tensor:
    """grad_s * dS/dv, dS/dv = (r - x^ (x^.r)) / |v| for |v| > eps, r / eps otherwise, with r = x^ - y^.

    Since |x^| = 1 when |v| > eps, r - x^ (x^.r) = x^ (x^.y^) - y^: one fused form, (x^ c - y^) / max(|v|, eps) with
    c = x^.y^ (or 1 below eps); fewer passes over the activation.
    """
    n2, inv = _inv_norm(v, eps)
    x_hat = v * inv
    c = torch.where(n2 > eps * eps, (x_hat * y_hat).sum(-1, keepdim=True), 1.0)
    return (x_hat * c - y_hat) * (inv * grad_s)


_KERNELS: dict[str, Callable] = {"fwd": _group_fwd_kernel, "bwd": _group_bwd_kernel}
_COMPILED: dict[str, Callable] = {}


def _kernel(name: str, compiled: bool) -> Callable:
    if not compiled:
        return _KERNELS[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_KERNELS[name], dynamic=True)
    return _COMPILED[name]


class _GroupTerm(torch.autograd.Function):
    """Group-mode term S_l with a hand-written backward that saves only (x, y^) and recomputes the group norms."""

    @staticmethod
    def forward(ctx, x: Tensor, y_hat: Tensor, group_size: int, eps: float, compiled: bool) -> Tensor:
        cd = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            s = _kernel("fwd", compiled)(group_view(x, group_size, cd), y_hat.to(cd), eps)
        ctx.save_for_backward(x, y_hat)
        ctx.group_size, ctx.eps, ctx.compiled = group_size, eps, compiled
        return s

    @staticmethod
    def backward(ctx, grad_s: Tensor):
        x, y_hat = ctx.saved_tensors
        g, cd = ctx.group_size, _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            gv = _kernel("bwd", ctx.compiled)(group_view(x, g, cd), y_hat.to(cd), ctx.eps, grad_s.to(cd))
        length = _flat(x).shape[-1]
        gx = gv.reshape(gv.shape[0], gv.shape[1], -1)[..., :length].reshape(x.shape).to(x.dtype)
        return gx, None, None, None, None


class _WholeTerm(torch.autograd.Function):
    """Whole-mode sum over samples of mean((x/s_x - y^)^2) with s_x detached; saves only (x, y^)."""

    @staticmethod
    def forward(ctx, x: Tensor, y_unit: Tensor) -> Tensor:
        cd = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            v = x.reshape(x.shape[0], -1).to(cd)
            s = torch.linalg.vector_norm(v, dim=1, keepdim=True) + _WHOLE_EPS
            out = (v / s - y_unit.to(cd)).square().mean(1).sum()
        ctx.save_for_backward(x, y_unit)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y_unit = ctx.saved_tensors
        cd = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            v = x.reshape(x.shape[0], -1).to(cd)
            s = torch.linalg.vector_norm(v, dim=1, keepdim=True) + _WHOLE_EPS
            g = (v / s - y_unit.to(cd)) * (2.0 / (v.shape[1] * s)) * grad_out.to(cd)
        return g.reshape(x.shape).to(x.dtype), None


def _whole_term_autograd(x: Tensor, y_unit: Tensor) -> Tensor:
    """Whole-mode term with the norm inside the graph (``detach_norm=False``)."""
    v = x.reshape(x.shape[0], -1).to(_compute_dtype(x))
    s = torch.linalg.vector_norm(v, dim=1, keepdim=True) + _WHOLE_EPS
    return (v / s - y_unit.to(v.dtype)).square().mean(1).sum()


def depth_weights(n: int, depth_weighting: str | Sequence[float] | None) -> Tensor:
    """Per-term weights w_l (fp64, shape (n,)) rescaled to mean 1: None -> 1, "exp" -> e^{0.1 l}, "linear" -> l+1."""
    if n <= 0:
        raise ValueError(f"depth_weights needs at least one term, got n={n}")
    if depth_weighting is None:
        return torch.ones(n, dtype=torch.float64)
    if isinstance(depth_weighting, str):
        idx = torch.arange(n, dtype=torch.float64)
        if depth_weighting == "exp":
            w = torch.exp(0.1 * idx)
        elif depth_weighting == "linear":
            w = idx + 1
        else:
            raise ValueError(f"depth_weighting={depth_weighting!r}; choose None, 'exp', 'linear' or a sequence of "
                             "floats (one per hooked call)")
    else:
        w = torch.as_tensor(list(depth_weighting), dtype=torch.float64)
        if w.numel() != n:
            raise ValueError(f"depth_weighting has {w.numel()} weights but the teacher made {n} hooked calls; "
                             "pass one weight per hooked call (in forward order)")
        if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"depth_weighting must be finite, non-negative and not all zero, got {w.tolist()}")
    return w * (n / w.sum())


def _check_options(mode: str, group_size: int, eps: float, layer_reduction: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if layer_reduction not in LAYER_REDUCTIONS:
        raise ValueError(f"layer_reduction={layer_reduction!r}; choose one of {LAYER_REDUCTIONS}")


def repalign_terms(xs: Sequence[Tensor], ys: Sequence[Tensor], *, mode: str = "group", group_size: int = 2,
                   eps: float = 1e-12, depth_weighting: str | Sequence[float] | None = None,
                   layer_reduction: str = "global", detach_norm: bool = True) -> tuple[Tensor, Tensor]:
    """Reference two-list path: the loss of student activations ``xs`` against target activations ``ys``.

    Plain autograd ops (F.pad, F.normalize), no custom Function: this is what the streamed loss must equal.
    Returns ``(loss, terms)``: the scalar loss and the (n,) per-term means (group: S_l / G_l; whole: mean_b m_lb).
    Activations of fewer than 2 dims must be filtered out by the caller.
    """
    _check_options(mode, group_size, eps, layer_reduction)
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need two non-empty lists of equal length, got {len(xs)} and {len(ys)}")
    w = depth_weights(len(xs), depth_weighting)
    sums, counts, terms = [], [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"term {i}: student shape {tuple(x.shape)} != target shape {tuple(y.shape)}")
        if x.dim() < 2:
            raise ValueError(f"term {i}: activations need at least 2 dims, got {tuple(x.shape)}")
        cd = _compute_dtype(x)
        if mode == "group":
            xg = F.normalize(group_view(x, group_size, cd), dim=-1, eps=eps)
            yg = F.normalize(group_view(y.detach(), group_size, cd), dim=-1, eps=eps)
            s = 0.5 * (xg - yg).square().sum()
            sums.append(s)
            counts.append(xg.numel() // group_size)
            terms.append(s.detach() / counts[-1])
        else:
            xv, yv = x.reshape(x.shape[0], -1).to(cd), y.detach().reshape(y.shape[0], -1).to(cd)
            sx = torch.linalg.vector_norm(xv, dim=1, keepdim=True) + _WHOLE_EPS
            if detach_norm:
                sx = sx.detach()
            sy = torch.linalg.vector_norm(yv, dim=1, keepdim=True) + _WHOLE_EPS
            s = (xv / sx - yv / sy).square().mean(1).sum()
            sums.append(s)
            counts.append(x.shape[0])
            terms.append(s.detach() / x.shape[0])
    wt = [float(v) for v in w]
    if mode == "group" and layer_reduction == "global":
        loss = sum(wi * si for wi, si in zip(wt, sums, strict=True)) / sum(counts)
    else:  # per-layer means (whole mode: sum_l w_l sum_b m_lb / (n B))
        loss = sum(wi * si / ci for wi, si, ci in zip(wt, sums, counts, strict=True)) / len(sums)
    return loss.float(), torch.stack(terms).float()


class TeacherInput(nn.Module):
    """A ``normalize`` for RepAlignLoss: [0, 1] images (B, 3, H, W) -> optional resize -> ``(x - mean) / std``.

    ``size``: (H, W) or int for a bilinear resize with ``antialias`` pinned (torchvision >= 0.17 and F.interpolate
    differ in their defaults); None keeps the shape. Shape-deterministic, as RepAlignLoss requires.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | tuple[int, int] | None = None,
                 antialias: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.antialias = antialias

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=self.antialias)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _as_tensor(output: object, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    raise TypeError(f"RepAlignLoss: hooked module {name!r} returned {type(output).__name__}, not a Tensor; "
                    "select tensor-valued modules with layer_types / layer_names")


def name_matches(name: str, pattern: str) -> bool:
    """fnmatch per dot-separated segment (``*`` stays inside one segment); a ``**`` segment spans any number.

    ``"blocks.*"`` selects ``blocks.0`` but not ``blocks.0.mlp``; ``"**.fc1"`` selects every ``fc1``.
    """
    return _match_parts(name.split("."), pattern.split("."))


def _match_parts(name: list[str], pat: list[str]) -> bool:
    if not pat:
        return not name
    if pat[0] == "**":
        return any(_match_parts(name[i:], pat[1:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], pat[0]) and _match_parts(name[1:], pat[1:])


def _remove_handles(handles: list) -> None:
    while handles:
        handles.pop().remove()


@dataclass
class _Target:
    name: str
    shape: tuple[int, ...]
    ref: Tensor | None  # y^ (group) or y/|y| rows (whole); set to None once its student term is built


@dataclass
class _CallState:
    """Everything one call needs; created per call and dropped at its end (nothing is kept between calls)."""

    targets: list[_Target] = field(default_factory=list)
    k: int = 0
    total: Tensor | None = None
    groups: int = 0
    terms: list[Tensor] = field(default_factory=list)
    versions: list[tuple[str, Tensor, int]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    want_terms: bool = False
    # configuration copied from the loss at the call (hooks never hold the loss itself)
    mode: str = "group"
    group_size: int = 2
    eps: float = 1e-12
    reduction: str = "global"
    target_dtype: torch.dtype | None = None
    detach_norm: bool = True
    early_exit: bool = True
    compiled: bool = False
    warned: set[str] = field(default_factory=set)


def _warn_once(warned: set[str], key: str, msg: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(msg, stacklevel=4)


def _target_hook(st: _CallState) -> Callable[[str], Callable]:
    """Target-pass hooks: convert each activation at once to its comparison form; the raw one is not kept.

    Hooks reference only the per-call state (never the loss), so a loss is collectable even with hooks attached.
    """
    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            t = _as_tensor(output, name)
            if t.dim() < 2:
                _warn_once(st.warned, f"1d:{name}", f"RepAlignLoss: module {name!r} gives a {t.dim()}-D activation "
                                                    f"{tuple(t.shape)}; it is skipped")
                return
            ref = _unit_groups(t, st.group_size, st.eps) if st.mode == "group" else _unit_rows(t)
            if st.target_dtype is not None:
                ref = ref.to(st.target_dtype)
            st.targets.append(_Target(name, tuple(t.shape), ref))
        return hook
    return make


def _student_hook(st: _CallState) -> Callable[[str], Callable]:
    """Student-pass hooks: add term k as soon as activation k arrives and release target k's list reference."""
    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = _as_tensor(output, name)
            if x.dim() < 2:
                return
            k = st.k
            if k >= len(st.targets):
                raise ValueError(f"RepAlignLoss: call-count mismatch: the student pass makes more hooked calls "
                                 f"than the target pass ({len(st.targets)}); extra call {k} at module {name!r}. "
                                 "The teacher must run the same modules for output and target.")
            tgt = st.targets[k]
            if tgt.name != name or tgt.shape != tuple(x.shape):
                raise ValueError(f"RepAlignLoss: hooked call {k}: student module {name!r} gives "
                                 f"{tuple(x.shape)} but the target pass had {tgt.name!r} with {tgt.shape}; "
                                 "output and target must take the same path through the teacher")
            ref, tgt.ref = tgt.ref, None  # the graph now owns the only reference
            if st.mode == "group":
                s = _GroupTerm.apply(x, ref, st.group_size, st.eps, st.compiled)
                count = num_groups(x.shape, st.group_size)
            elif st.detach_norm:
                s = _WholeTerm.apply(x, ref)
                count = x.shape[0]
            else:
                s = _whole_term_autograd(x, ref)
                count = x.shape[0]
            w = st.weights[k]
            contrib = s * w if st.mode == "group" and st.reduction == "global" else s * (w / count)
            st.total = contrib if st.total is None else st.total + contrib
            st.groups += count
            if st.want_terms:
                st.terms.append(s.detach() / count)
            st.versions.append((name, x, x._version))
            st.k = k + 1
            if st.early_exit and st.k == len(st.targets):
                raise _StopForward
        return hook
    return make


# ---------------------------------------------------------------------------------------------------- the loss
class RepAlignLoss(nn.Module):
    """Perceptual loss from the activations of a frozen ``teacher`` (see the module docstring and the spec).

    Args:
        teacher: any nn.Module (timm ViT, ResNet, ...); frozen, kept in eval, not part of ``parameters()``.
        normalize: callable applied to output and target before the teacher (e.g. resize + mean/std); None =
            identity. A resize in it should pin ``antialias`` explicitly.
        layer_types: hook modules of these types (None: any type).
        layer_names: and whose qualified names match one of these patterns (None: any name): fnmatch per
            dot-separated segment, ``**`` spanning segments (see :func:`name_matches`).
        mode: ``"group"`` (localized pairs, default) or ``"whole"`` (whole-activation normalisation).
        group_size: g, the group length in group mode.
        eps: group-norm floor, ``v / max(|v|, eps)``.
        depth_weighting: None, ``"exp"``, ``"linear"`` or one float per hooked call; rescaled to mean 1.
        layer_reduction: group mode: ``"global"`` mean over all groups or ``"per_layer"`` mean of term means.
            Whole mode always averages the per-term values (both options give the same result).
        target_dtype: dtype the pre-normalised targets are stored in (e.g. torch.bfloat16); None = fp32.
        detach_norm: whole mode: treat the student's norm s_x as a constant (upstream); False = true gradient.
        early_exit: stop the student pass after the last hooked call (skips e.g. a classifier head).
        compile_terms: run the group-term kernels through ``torch.compile`` (useful on GPU).

    ``forward(output, target, return_terms=False)`` -> fp32 scalar (and the detached (n,) per-term means).
    """

    def __init__(self, teacher: nn.Module, normalize: Callable[[Tensor], Tensor] | None = None, *,
                 layer_types: tuple[type[nn.Module], ...] | None = (nn.Conv2d, nn.Linear),
                 layer_names: Sequence[str] | None = None, mode: str = "group", group_size: int = 2,
                 eps: float = 1e-12, depth_weighting: str | Sequence[float] | None = None,
                 layer_reduction: str = "global", target_dtype: torch.dtype | None = None,
                 detach_norm: bool = True, early_exit: bool = True, compile_terms: bool = False):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if normalize is not None and not callable(normalize):
            raise TypeError(f"normalize must be callable or None, got {type(normalize).__name__}")
        _check_options(mode, group_size, eps, layer_reduction)
        if layer_types is None and layer_names is None:
            raise ValueError("give layer_types and/or layer_names: with both None every module would be hooked")
        if isinstance(layer_names, str):
            layer_names = [layer_names]
        if isinstance(depth_weighting, str):
            depth_weights(1, depth_weighting)  # validate the name now
        teacher.requires_grad_(False)
        teacher.eval()
        # stored outside _modules: not in parameters() / state_dict() / a parent's train(); moved by _apply below
        object.__setattr__(self, "_teacher", teacher)
        self.normalize = normalize
        self.layer_types = tuple(layer_types) if layer_types is not None else None
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.mode, self.group_size, self.eps = mode, group_size, float(eps)
        self.depth_weighting = depth_weighting
        self.layer_reduction = layer_reduction
        self.target_dtype, self.detach_norm, self.early_exit = target_dtype, detach_norm, early_exit
        self.compile_terms = compile_terms
        self.hooked: list[tuple[str, nn.Module]] = self._select()
        self._warned: set[str] = set()
        self._closed = False
        # hooks only exist during a call; these guards remove any left (e.g. a call interrupted by another thread)
        self._handles: list = []
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    # ----------------------------------------------------------------------------------- module plumbing
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half() reach the teacher
        super()._apply(fn, recurse)
        self._teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> RepAlignLoss:
        super().train(mode)
        if not self.__dict__.get("_in_train", False):  # guard: the loss may itself sit inside its teacher
            self.__dict__["_in_train"] = True
            try:
                self._teacher.eval()
            finally:
                self.__dict__["_in_train"] = False
        return self

    def close(self) -> None:
        """Remove any hook of this loss from the teacher; later calls raise."""
        _remove_handles(self._handles)
        self._closed = True

    def __enter__(self) -> RepAlignLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, group_size={self.group_size}, hooked_modules={len(self.hooked)}, "
                f"layer_reduction={self.layer_reduction!r}, depth_weighting={self.depth_weighting!r}")

    def _select(self) -> list[tuple[str, nn.Module]]:
        chosen = []
        for name, m in self._teacher.named_modules():
            if not name:  # the teacher itself: its output is not an intermediate activation
                continue
            if self.layer_types is not None and not isinstance(m, self.layer_types):
                continue
            if self.layer_names is not None and not any(name_matches(name, p) for p in self.layer_names):
                continue
            chosen.append((name, m))
        if not chosen:
            present = sorted({type(m).__name__ for _, m in self._teacher.named_modules()})
            types = [t.__name__ for t in self.layer_types] if self.layer_types else None
            raise ValueError(f"RepAlignLoss: no module of teacher {type(self._teacher).__name__} matches "
                             f"layer_types={types} and layer_names={self.layer_names}; module types present: "
                             f"{present}. Pass layer_types / layer_names that select some of them.")
        return chosen

    def _state(self, want_terms: bool = False) -> _CallState:
        return _CallState(want_terms=want_terms, mode=self.mode, group_size=self.group_size, eps=self.eps,
                          reduction=self.layer_reduction, target_dtype=self.target_dtype,
                          detach_norm=self.detach_norm, early_exit=self.early_exit, compiled=self.compile_terms,
                          warned=self._warned)

    def _ensure_eval(self) -> None:
        if any(m.training for m in self._teacher.modules()):
            _warn_once(self._warned, "train", "RepAlignLoss: the teacher was put in train mode (teacher.train() called "
                                     "directly); switching it back to eval()")
            self._teacher.eval()

    # ----------------------------------------------------------------------------------- hooks
    def _register(self, make_hook: Callable[[str], Callable]) -> None:
        for name, m in self.hooked:
            self._handles.append(m.register_forward_hook(make_hook(name)))

    # ----------------------------------------------------------------------------------- the call
    def _prepare(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(output, Tensor) or not isinstance(target, Tensor):
            raise TypeError(f"RepAlignLoss(output, target) takes tensors, got {type(output).__name__} and "
                            f"{type(target).__name__}")
        if output.shape != target.shape:
            raise ValueError(f"RepAlignLoss: output shape {tuple(output.shape)} != target shape "
                             f"{tuple(target.shape)}; pass an output and a target of the same shape")
        if self.normalize is None:
            return output, target.detach()
        out_n = self.normalize(output)
        with torch.no_grad():
            tgt_n = self.normalize(target.detach())
        if not isinstance(out_n, Tensor) or not isinstance(tgt_n, Tensor):
            raise TypeError(f"RepAlignLoss: normalize must return tensors, got {type(out_n).__name__}")
        if out_n.shape != tgt_n.shape or out_n.shape[:1] != output.shape[:1]:
            raise ValueError(f"RepAlignLoss: normalize changed shapes inconsistently: output {tuple(output.shape)} "
                             f"-> {tuple(out_n.shape)}, target {tuple(target.shape)} -> {tuple(tgt_n.shape)}; it must "
                             "map equal shapes to equal shapes and keep the batch size (e.g. a fixed-size resize)")
        return out_n, tgt_n

    def _enter(self) -> None:
        if self._closed:
            raise RuntimeError("RepAlignLoss: this loss was closed; create a new one")
        if self._teacher in _BUSY_TEACHERS:
            raise RuntimeError("RepAlignLoss: nested call on a teacher that is already inside a RepAlignLoss call "
                               "(called from a hook or another thread?); calls on one teacher must not overlap")
        self._ensure_eval()
        _BUSY_TEACHERS.add(self._teacher)

    def _exit(self) -> None:
        _remove_handles(self._handles)
        _BUSY_TEACHERS.discard(self._teacher)

    def forward(self, output: Tensor, target: Tensor, return_terms: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Loss of ``output`` against ``target`` (same shape, e.g. (B, 3, H, W) images); fp32 scalar."""
        out_n, tgt_n = self._prepare(output, target)
        st = self._state(return_terms)
        self._enter()
        try:
            self._register(_target_hook(st))
            with torch.no_grad():
                self._teacher(tgt_n)
            _remove_handles(self._handles)
            if not st.targets:
                raise ValueError(f"RepAlignLoss: the target pass made no usable hooked call among "
                                 f"{[n for n, _ in self.hooked][:8]}...; select modules the forward runs")
            st.weights = depth_weights(len(st.targets), self.depth_weighting).tolist()
            self._register(_student_hook(st))
            try:
                self._teacher(out_n)
            except _StopForward:
                pass
        finally:
            self._exit()
        if st.k != len(st.targets):
            first = st.targets[st.k]
            raise ValueError(f"RepAlignLoss: call-count mismatch: the student pass made {st.k} hooked calls, the "
                             f"target pass {len(st.targets)}; first missing call {st.k} at module {first.name!r}")
        for name, x, version in st.versions:
            if x._version != version:
                raise RuntimeError(f"RepAlignLoss: the teacher modified the output of hooked module {name!r} in "
                                   "place, so its gradient would be wrong; exclude it with layer_names / "
                                   "layer_types or disable the in-place op in the teacher")
        n = len(st.targets)
        if self.mode == "group" and self.layer_reduction == "global":
            loss = st.total / st.groups
        else:
            loss = st.total / n
        loss = loss.float()
        if return_terms:
            return loss, torch.stack(st.terms).float()
        return loss

    @torch.no_grad()
    def capture(self, x: Tensor) -> list[Tensor]:
        """A fresh list of the raw hooked activations of ``teacher(normalize(x))`` (clones; never internal state)."""
        acts: list[Tensor] = []

        def make(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                t = _as_tensor(output, name)
                if t.dim() >= 2:
                    acts.append(t.detach().clone())
            return hook

        xin = self.normalize(x) if self.normalize is not None else x
        self._enter()
        try:
            self._register(make)
            self._teacher(xin)
        finally:
            self._exit()
        return acts
