"""NeCo: patch-neighbour-consistency dense post-training (Pariza et al., ICLR 2025). Pure torch, no Lightning.

One step (see docs/methods/neco.md): the EMA teacher encodes the 2 global crops, the student all K crops (one
backbone call per crop size), both through a projection head with L2 normalisation, maps (B, E, h, w). For each
ordered pair (c, v), c in {0, 1}, v != c, ROIAlign crops the overlap of the teacher's global map c and the student's
map v to r x r bins; each of the B·r² aligned query patches is compared (cosine) with n = r² reference patches drawn
from a FIFO queue of teacher tokens; the similarity rows are soft-sorted (teacher under no_grad) and the loss is the
cross-entropy from the teacher's to the student's soft permutation matrices, averaged over the 2 (K - 1) pairs.

Shapes: B images, E head width (256), r ROI side (7), n = r² references, K crops.

The package: this core, the differentiable sorting networks (:mod:`.softsort`), the multi-crop views with their
overlap boxes (:mod:`.views`) and the Lightning module (:mod:`.lightning`, the only part that imports Lightning).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ..training import cosine_schedule
from ..training import param_groups as _param_groups
from .softsort import SoftSort, soft_sort
from .views import NeCoDataset, NeCoViews, neco_collate

__all__ = ["FeatureQueue", "NeCo", "NeCoConfig", "NeCoDataset", "NeCoViews", "ProjectionHead", "SoftSort", "align",
           "cosine_schedule", "draw_indices", "ema_update_", "neco_collate", "pair_loss", "param_groups",
           "similarities", "soft_sort", "sorting_cross_entropy"]


# ----------------------------------------------------------------------------------------------- config
@dataclass
class NeCoConfig:
    """The method's numbers (defaults: the DINOv2 ViT-S/14 config)."""

    head_layers: int = 3
    head_hidden: int = 2048
    head_dim: int = 256
    teacher_head_init: str = "random"  # random | copy
    use_teacher: bool = True
    roi_size: int = 7
    student_steepness: float = 100.0
    teacher_steepness: float = 100.0
    sort_net: str = "bitonic"
    sim: str = "cosine"  # cosine | euclidean
    reference_source: str = "queue"  # queue | batch
    queue_length: int = 8192
    push_per_image: int = 10
    loss_mask: str = "all"
    momentum_start: float = 0.9995
    momentum_end: float = 1.0

    def __post_init__(self) -> None:
        choices = {"teacher_head_init": ("random", "copy"), "sort_net": ("bitonic", "odd_even"),
                   "sim": ("cosine", "euclidean"), "reference_source": ("queue", "batch")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"neco.{key}={getattr(self, key)!r}; choose one of {list(allowed)}")
        if self.loss_mask != "all":
            raise ValueError(f"neco.loss_mask={self.loss_mask!r}: only 'all' (the released configs) is implemented; "
                             "the fg/bg attention masks are ablations not available in dinokit yet")
        if self.roi_size < 1 or self.head_layers < 1 or self.queue_length < 1:
            raise ValueError(f"neco: roi_size, head_layers and queue_length must be >= 1 (got {self.roi_size}, "
                             f"{self.head_layers}, {self.queue_length})")
        for key in ("student_steepness", "teacher_steepness"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                raise ValueError(f"neco.{key} must be a positive finite number, got {getattr(self, key)}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- head
class ProjectionHead(nn.Module):
    """Per-token MLP D -> 2048 -> 2048 -> E (exact GELU, no norms) or one Linear(D, E); output float32 and unit L2
    norm: z / max(||z||, 1e-12). Init trunc-normal(0.02, cut at ±2), biases 0."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 256, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, E) float32, unit norm."""
        return F.normalize(self.mlp(x).float(), dim=-1, eps=1e-12)


# ------------------------------------------------------------------------------------------- queue
class FeatureQueue(nn.Module):
    """FIFO of teacher tokens, newest first: ``rows`` (L, E), valid count ``count`` (buffers, checkpointed)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.register_buffer("rows", torch.zeros(length, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def length(self) -> int:
        return self.rows.shape[0]

    def pushed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, count) after pushing ``tokens`` (m, E) (m <= L) on top; the queue itself is unchanged."""
        m = tokens.shape[0]
        if m > self.length:
            raise ValueError(f"cannot push {m} rows into a queue of length {self.length}")
        rows = torch.cat([tokens.detach().to(self.rows.dtype), self.rows[: self.length - m]], 0)
        return rows, torch.clamp(self.count + m, max=self.length)

    @torch.no_grad()
    def set(self, rows: torch.Tensor, count: torch.Tensor) -> None:
        self.rows.copy_(rows)
        self.count.copy_(count)

    @torch.no_grad()
    def push(self, tokens: torch.Tensor) -> None:
        self.set(*self.pushed(tokens))


def draw_indices(k: int, length: int, count: int, generator: torch.Generator | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """k row indices of a queue of ``length`` with ``count`` valid rows (reference formula randperm(L)[:k] mod
    count when k <= L, else uniform with replacement); never >= count."""
    if count < 1:
        raise ValueError("cannot draw references from an empty queue; push teacher tokens first")
    if k <= length:
        return torch.randperm(length, generator=generator, device=device)[:k] % count
    return torch.randint(0, count, (k,), generator=generator, device=device)


# ------------------------------------------------------------------------------------------- alignment
def align(maps: torch.Tensor, boxes: torch.Tensor, patch_size: int, r: int) -> torch.Tensor:
    """ROIAlign one box per image: maps (B, E, h, w), boxes (B, 4) in crop pixels -> (B, E, r, r) float32.

    Boxes are divided by the patch size (token units: token (i, j) covers [j, j+1) x [i, i+1)); aligned=True,
    sampling_ratio -1, autocast off."""
    B = maps.shape[0]
    if boxes.shape != (B, 4):
        raise ValueError(f"expected one (x1, y1, x2, y2) box per image, shape ({B}, 4), got {tuple(boxes.shape)}")
    with torch.autocast(device_type=maps.device.type, enabled=False):
        rois = torch.cat([torch.arange(B, device=maps.device, dtype=torch.float32)[:, None],
                          boxes.to(device=maps.device, dtype=torch.float32) / patch_size], 1)
        return roi_align(maps.float(), rois, output_size=(r, r), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ------------------------------------------------------------------------------------------- loss
def similarities(queries: torch.Tensor, refs: torch.Tensor, sim: str = "cosine") -> torch.Tensor:
    """queries (B, q, E), refs (B, n, E) -> (B, q, n): cosine (eps 1e-12) or Euclidean distance."""
    if sim == "cosine":
        return F.normalize(queries, dim=-1, eps=1e-12) @ F.normalize(refs, dim=-1, eps=1e-12).transpose(1, 2)
    return torch.cdist(queries, refs)


def sorting_cross_entropy(Q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """-(1 / (B q n)) sum Q log max(P, 1e-30) for Q, P (B, q, n, n): mean over (image, query, reference) rows of the
    cross-entropy summed over the rank axis."""
    return -(Q * P.clamp_min(1e-30).log()).sum(-1).mean()


def pair_loss(t_aligned: torch.Tensor, s_aligned: torch.Tensor, refs: torch.Tensor, teacher_steepness: float = 100.0,
              student_steepness: float = 100.0, sort_net: str = "bitonic", sim: str = "cosine") -> torch.Tensor:
    """L_{c,v} for aligned teacher/student maps (B, E, r, r) and references (B, n, E) (detached); see
    docs/methods/neco.md."""
    with torch.autocast(device_type=s_aligned.device.type, enabled=False):
        refs = refs.detach().float()
        tq = t_aligned.detach().float().flatten(2).transpose(1, 2)  # (B, r², E), row-major bins
        sq = s_aligned.float().flatten(2).transpose(1, 2)
        with torch.no_grad():
            _, Q = soft_sort(similarities(tq, refs, sim), teacher_steepness, sort_net)
        _, P = soft_sort(similarities(sq, refs, sim), student_steepness, sort_net, segment=10 ** 9)
        return sorting_cross_entropy(Q, P)


# ------------------------------------------------------------------------------------------- EMA, groups
@torch.no_grad()
def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """theta_T <- m theta_T + (1 - m) theta_S for every pair (in place)."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"EMA needs matching parameter lists, got {len(teacher)} teacher and {len(student)} student")
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)


def param_groups(backbone: nn.Module, head: nn.Module, lr_backbone: float, lr_head: float,
                 weight_decay: float = 0.04) -> list[dict]:
    """AdamW groups in order: backbone-decay, backbone-no-decay, head-decay, head-no-decay. No-decay = names ending
    in ``.bias`` or 1-D tensors (norms, LayerScale); cls/pos/register tokens decay. Frozen parameters are left out.
    The NeCo setting of :func:`dinokit.methods.training.param_groups`."""
    return _param_groups({"backbone": backbone, "head": head}, weight_decay,
                         lr={"backbone": lr_backbone, "head": lr_head})


# ------------------------------------------------------------------------------------------- the model
class NeCo(nn.Module):
    """Student and EMA teacher (backbone + projection head), per-crop queues and the NeCo loss.

    ``forward(batch, references=None)`` -> dict with ``loss`` (scalar) and ``pending`` queue states;
    ``commit_queues(out)`` applies the pushes (call it only for finite steps); ``ema_step(t, total)`` updates
    the teacher. ``batch``: ``crops`` list of K tensors (B, 3, S_k, S_k), ``gc`` (B, 2, K, 4), ``all`` (B, K, 2, 4).
    ``references``: optional (B, n, E) tensor used for every pair instead of drawing (tests, DDP parity).
    """

    def __init__(self, student, teacher=None, config: NeCoConfig | None = None, world_size: int = 1, rank: int = 0,
                 seed: int = 0):
        super().__init__()
        self.cfg = cfg = config or NeCoConfig()
        self.student = student
        D = student.embed_dim
        self.student_head = ProjectionHead(D, cfg.head_hidden, cfg.head_dim, cfg.head_layers)
        if cfg.use_teacher:
            if teacher is None:
                teacher = copy.deepcopy(student)
            else:
                teacher.load_state_dict(student.state_dict())
            self.teacher = teacher
            self.teacher_head = ProjectionHead(D, cfg.head_hidden, cfg.head_dim, cfg.head_layers)
            if cfg.teacher_head_init == "copy":
                self.teacher_head.load_state_dict(self.student_head.state_dict())
            for p in (*self.teacher.parameters(), *self.teacher_head.parameters()):
                p.requires_grad_(False)
        else:
            self.teacher, self.teacher_head = None, None
        self.queue_len = max(1, cfg.queue_length // max(1, world_size))
        self.queues = nn.ModuleList([FeatureQueue(self.queue_len, cfg.head_dim) for _ in range(2)])
        self.rank, self.seed = rank, seed
        self._gen: torch.Generator | None = None

    # -------------------------------------------------------------- helpers
    def train(self, mode: bool = True) -> NeCo:
        """Train mode for the student; the teacher always runs in eval mode (no drop-path, no dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher_head.eval()
        return self

    @property
    def patch_size(self) -> int:
        return self.student.patch_size

    def generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed * 1_000_003 + self.rank)
        return self._gen

    def teacher_modules(self) -> tuple[nn.Module, nn.Module]:
        if self.teacher is None:
            return self.student, self.student_head
        return self.teacher, self.teacher_head

    @staticmethod
    def encode(backbone, head: nn.Module, crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Projected, normalised maps (B, E, h, w) for every crop; one backbone call per crop size."""
        out: list[torch.Tensor | None] = [None] * len(crops)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, c in enumerate(crops):
            by_size.setdefault(tuple(c.shape[-2:]), []).append(k)
        for idx in by_size.values():
            x = torch.cat([crops[k] for k in idx], 0)
            f = backbone.forward_features(x)
            z = head(f.patch)  # (n·B, h, w, E) float32
            for k, zk in zip(idx, z.chunk(len(idx), 0)):
                out[k] = zk.permute(0, 3, 1, 2)
        return out  # type: ignore[return-value]

    def draw_references(self, c: int, B: int, n: int, pending: dict, t_aligned: torch.Tensor) -> torch.Tensor:
        """(B, n, E) references for a pair with teacher crop c (detached)."""
        gen = self.generator(t_aligned.device)
        if self.cfg.reference_source == "batch":
            pool = t_aligned.detach().flatten(2).transpose(1, 2).reshape(B * n, -1)
            perm = torch.randperm(B * n, generator=gen, device=pool.device)
            return pool[perm].reshape(B, n, -1)
        rows, count = pending[c]
        idx = draw_indices(B * n, rows.shape[0], int(count), gen, rows.device)
        return rows[idx].reshape(B, n, -1)

    # -------------------------------------------------------------- the step
    def forward(self, batch: dict, references: torch.Tensor | None = None) -> dict:
        crops, gc, all_ = batch["crops"], batch["gc"], batch["all"]
        K, B = len(crops), crops[0].shape[0]
        if K < 2 or gc.shape != (B, 2, K, 4) or all_.shape != (B, K, 2, 4):
            raise ValueError(f"NeCo batch: expected K >= 2 crops with gc (B, 2, K, 4) and all (B, K, 2, 4); got "
                             f"K={K}, gc {tuple(gc.shape)}, all {tuple(all_.shape)}")
        r, p, cfg = self.cfg.roi_size, self.patch_size, self.cfg
        n = r * r
        t_bb, t_head = self.teacher_modules()
        with torch.no_grad():
            T = self.encode(t_bb, t_head, crops[:2])
        Z = self.encode(self.student, self.student_head, crops)
        pending = {}
        gen = self.generator(T[0].device)
        with torch.no_grad():  # queue push before the loss (reference order), committed later if the step is finite
            for c in range(2):
                tokens = T[c].permute(0, 2, 3, 1).reshape(-1, T[c].shape[1])
                m = min(cfg.push_per_image * B, self.queue_len, tokens.shape[0])
                sel = torch.randperm(tokens.shape[0], generator=gen, device=tokens.device)[:m]
                pending[c] = self.queues[c].pushed(tokens[sel])
        losses = {}
        for c in range(2):
            for v in range(K):
                if v == c:
                    continue
                t_al = align(T[c], gc[:, c, v], p, r)
                s_al = align(Z[v], all_[:, v, c], p, r)
                R = references if references is not None else self.draw_references(c, B, n, pending, t_al)
                if R.shape[:2] != (B, n):
                    raise ValueError(f"references must be (B={B}, n={n}, E), got {tuple(R.shape)}")
                losses[(c, v)] = pair_loss(t_al, s_al, R, cfg.teacher_steepness, cfg.student_steepness,
                                           cfg.sort_net, cfg.sim)
        loss = sum(losses.values()) / len(losses)
        return {"loss": loss, "pair_losses": losses, "pending": pending}

    @torch.no_grad()
    def commit_queues(self, out: dict) -> None:
        """Apply the queue pushes staged by :meth:`forward` (only for finite steps)."""
        for c, (rows, count) in out["pending"].items():
            self.queues[c].set(rows, count)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching (teacher, student) tensors: backbone and head parameters."""
        if self.teacher is None:
            return [], []
        t = [*self.teacher.parameters(), *self.teacher_head.parameters()]
        s = [*self.student.parameters(), *self.student_head.parameters()]
        return t, s

    @torch.no_grad()
    def ema_step(self, t: int, total: int) -> float:
        """Teacher EMA with m(t) (cosine 0.9995 -> 1 over ``total`` optimiser steps); returns m."""
        m = cosine_schedule(t, total, self.cfg.momentum_start, self.cfg.momentum_end)
        ema_update_(*self.ema_pairs(), m)
        return m
