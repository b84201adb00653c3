"""DINO-style self-distillation for small ViTs: head, losses, EMA teacher (pure torch; no Lightning import).

A student ViT and an EMA teacher of the same architecture see multi-crop views of an image. The teacher's outputs on
the global views, centred and sharpened, are the targets of the student's outputs on every other view
(``DINOLoss``); optionally the student also sees the global views with some patches replaced by a learned mask token
and predicts the teacher's per-patch outputs at those positions (``MaskedPatchLoss``, the iBOT-style dense term).
The teacher gets no gradient; it follows the student by an exponential moving average. See docs/methods/dino.md.

Shapes: images (B, 3, S, S); head outputs (B, K) for the CLS token and (B, N, K) for patch tokens; masks (B, h, w).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..neco import ema_update_
from ..training import cosine_schedule

__all__ = ["DINO", "DINOHead", "DINOLoss", "MaskedPatchLoss", "cosine_schedule", "lr_at", "momentum_schedule",
           "teacher_temperature", "vit_tokens"]


# ---------------------------------------------------------------------------------------------- head
class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear + GELU, last one to ``bottleneck``) -> L2 normalisation -> weight-normalised
    Linear(bottleneck, out_dim, bias=False). With ``norm_last_layer`` the weight-norm gain is fixed to 1, so each
    output is a cosine between the normalised bottleneck and a unit prototype. (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 2048, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers} must be >= 1")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError(f"head widths must be positive, got in {in_dim}, out {out_dim}, hidden {hidden_dim}, "
                             f"bottleneck {bottleneck_dim}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


# ---------------------------------------------------------------------------------------------- losses
def _all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened distribution on each global view and the student's
    distribution on every other view:

        L = 1/|P| sum_{(t, s) in P} mean_b sum_k -softmax((T_t - c) / tau_t)_k log softmax(S_s / tau_s)_k,

    P = all pairs of a teacher global view t and a student view s != t. After each call ``update_center`` moves the
    centre c (1, K) towards the batch mean of the teacher outputs: c <- m c + (1 - m) mean_b T.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum={center_momentum} must be in [0, 1]")
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        """``student_out``: one (B, K) tensor per view, the global views first; ``teacher_out``: one per global view."""
        if len(teacher_out) < 1 or len(student_out) < 2:
            raise ValueError(f"DINOLoss needs >= 1 teacher and >= 2 student views, got {len(teacher_out)} and "
                             f"{len(student_out)}")
        targets = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach() for t in teacher_out]
        logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        total, n = 0.0, 0
        for ti, t in enumerate(targets):
            for si, lp in enumerate(logp):
                if si == ti:
                    continue
                total = total + torch.sum(-t * lp, dim=-1).mean()
                n += 1
        self.update_center(torch.cat([t.detach().float() for t in teacher_out]))
        return total / n

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean over the (global) batch of ``teacher_out`` (B, K)."""
        batch_center = _all_mean(teacher_out.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class MaskedPatchLoss(nn.Module):
    """Masked-patch self-distillation (iBOT-style): for each global view, the student's patch outputs on the
    masked view are trained towards the teacher's centred, sharpened patch outputs on the unmasked view, at the
    masked positions only:

        L = mean_views mean_b [ sum_n m_bn CE(q_bn, p_bn) / max(sum_n m_bn, 1) ],
        q = softmax((T - c) / tau_t), p = softmax(S / tau_s).

    Images without masked patches contribute 0 to the mean (as in iBOT). The centre (1, K) follows the mean teacher
    patch output: c <- m c + (1 - m) mean_{b, n} T.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum={center_momentum} must be in [0, 1]")
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_patches: Sequence[torch.Tensor], teacher_patches: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """(B, N, K) student and teacher patch outputs and (B, N) or (B, h, w) boolean masks, one per global view."""
        if not (len(student_patches) == len(teacher_patches) == len(masks)) or not masks:
            raise ValueError(f"need one student, teacher and mask tensor per global view, got {len(student_patches)}, "
                             f"{len(teacher_patches)}, {len(masks)}")
        total = 0.0
        for s, t, m in zip(student_patches, teacher_patches, masks):
            m = m.reshape(m.shape[0], -1).to(s.dtype)
            if m.shape[1] != s.shape[1]:
                raise ValueError(f"mask has {m.shape[1]} cells but the student has {s.shape[1]} patch outputs")
            q = F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach()
            ce = torch.sum(-q * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)  # (B, N)
            total = total + ((ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        self.update_center(torch.cat([t.detach().float().reshape(-1, t.shape[-1]) for t in teacher_patches]))
        return total / len(masks)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean over all (global) patch outputs ``teacher_out`` (M, K)."""
        batch_center = _all_mean(teacher_out.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature: linear from ``start`` to ``end`` over ``warmup_steps``, then ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * step / warmup_steps)


# ---------------------------------------------------------------------------------------------- model
def vit_tokens(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm tokens (B, prefix + h*w, D) of a timm ViT on (B, 3, H, W) images; where ``mask`` (B, h, w) is
    true the patch embedding is replaced by ``mask_token`` (D,) before the position embedding is added."""
    t = model.patch_embed(x)
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask_token")
        if t.ndim == 3:  # (B, N, D) patch embeddings (a model created without dynamic_img_size)
            m = mask.reshape(t.shape[0], -1, 1)
        else:  # (B, h, w, D)
            m = mask.reshape(*t.shape[:3], 1)
        t = torch.where(m, mask_token.to(t.dtype), t)
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    t = model.norm_pre(t)
    t = model.blocks(t)
    return model.norm(t)


class DINO(nn.Module):
    """Student ViT + heads, an EMA teacher copy, the DINO (CLS) loss and the optional masked-patch loss.

    ``backbone``: a timm VisionTransformer (e.g. ``load_backbone(...).model``); the teacher starts as an exact copy
    and never receives gradients. ``patch_weight`` > 0 adds :class:`MaskedPatchLoss` with its own head
    (``patch_out_dim`` prototypes). ``forward(global_views, local_views, masks, teacher_temp)`` -> dict of the
    scalar ``loss`` (CLS loss + patch_weight x patch loss), ``cls_loss`` and ``patch_loss``.
    """

    def __init__(self, backbone: nn.Module, out_dim: int = 2048, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 nlayers: int = 3, norm_last_layer: bool = True, patch_weight: float = 0.0,
                 patch_out_dim: int = 1024, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if patch_weight < 0:
            raise ValueError(f"patch_weight={patch_weight} must be >= 0")
        D = int(getattr(backbone, "embed_dim", 0) or backbone.num_features)
        self.num_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.student = backbone
        self.student_head = DINOHead(D, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
        self.patch_weight = float(patch_weight)
        if self.patch_weight > 0:
            self.student_patch_head = DINOHead(D, patch_out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
            self.mask_token = nn.Parameter(torch.zeros(D))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.teacher = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.student_head)
        if self.patch_weight > 0:
            self.teacher_patch_head = copy.deepcopy(self.student_patch_head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self.cls_loss = DINOLoss(out_dim, student_temp, center_momentum)
        self.patch_loss = MaskedPatchLoss(patch_out_dim, student_temp, center_momentum) if patch_weight > 0 else None

    # pairs of (teacher, student) modules that the EMA ties together
    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher, self.student), (self.teacher_head, self.student_head)]
        if self.patch_weight > 0:
            pairs.append((self.teacher_patch_head, self.student_patch_head))
        return pairs

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [p for t, _ in self._pairs() for p in t.parameters()]

    def student_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (student backbone, heads, mask token)."""
        out = [p for _, s in self._pairs() for p in s.parameters() if p.requires_grad]
        if self.patch_weight > 0:
            out.append(self.mask_token)
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_teacher <- m theta_teacher + (1 - m) theta_student for the backbone and the heads (buffers are
        copied)."""
        for t, s in self._pairs():
            ema_update_(t.parameters(), s.parameters(), momentum)
            for bt, bs in zip(t.buffers(), s.buffers()):
                bt.copy_(bs)

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths or tokens
        return self

    def forward(self, global_views: Sequence[torch.Tensor], local_views: Sequence[torch.Tensor] = (),
                masks: Sequence[torch.Tensor] | None = None, teacher_temp: float = 0.04) -> dict[str, torch.Tensor]:
        n_g = len(global_views)
        use_patch = self.patch_weight > 0
        if use_patch and (masks is None or len(masks) != n_g):
            raise ValueError(f"patch_weight > 0 needs one (B, h, w) mask per global view ({n_g}); got "
                             f"{0 if masks is None else len(masks)}")
        P = self.num_prefix
        with torch.no_grad():
            t_tok = vit_tokens(self.teacher, torch.cat(list(global_views)))
            t_cls = self.teacher_head(t_tok[:, 0]).chunk(n_g)
            t_patch = self.teacher_patch_head(t_tok[:, P:]).chunk(n_g) if use_patch else None
        s_tok = vit_tokens(self.student, torch.cat(list(global_views)),
                           torch.cat(list(masks)) if use_patch else None,
                           self.mask_token if use_patch else None)
        s_cls = list(self.student_head(s_tok[:, 0]).chunk(n_g))
        if local_views:
            sizes = [v.shape[-1] for v in local_views]
            if len(set(sizes)) == 1:
                loc = vit_tokens(self.student, torch.cat(list(local_views)))[:, 0]
                s_cls += list(self.student_head(loc).chunk(len(local_views)))
            else:
                s_cls += [self.student_head(vit_tokens(self.student, v)[:, 0]) for v in local_views]
        cls_loss = self.cls_loss(s_cls, list(t_cls), teacher_temp)
        out = {"cls_loss": cls_loss}
        if use_patch:
            s_patch = self.student_patch_head(s_tok[:, P:]).chunk(n_g)
            patch_loss = self.patch_loss(list(s_patch), list(t_patch), list(masks), teacher_temp)
            out["patch_loss"] = patch_loss
            out["loss"] = cls_loss + self.patch_weight * patch_loss
        else:
            out["patch_loss"] = torch.zeros((), device=cls_loss.device)
            out["loss"] = cls_loss
        return out


def momentum_schedule(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from ``base`` to ``final`` over ``total`` steps (DINO)."""
    return cosine_schedule(step, total, base, final)


def lr_at(step: int, total: int, warmup: int, base: float, final: float = 1e-6) -> float:
    """Learning rate: linear warm-up from 0 over ``warmup`` steps, then a cosine from ``base`` to ``final``."""
    if warmup > 0 and step < warmup:
        return base * step / warmup
    return cosine_schedule(step - warmup, max(1, total - warmup), base, final)
