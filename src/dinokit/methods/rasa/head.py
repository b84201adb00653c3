"""RASA maths, pure torch: Gram-Schmidt bases, single-stage removal, the sequential head, its exact folded operator
and the ``DenseFeatures`` transform. See docs/methods/rasa.md.

A stage t holds a bias-free regressor W_t (2, D) (row 0 predicts a token's row, row 1 its column, both in [0, 1]
through a sigmoid). Its removal projects every token off span(W_t), with the basis built by Gram-Schmidt with the
row regressor first (:func:`rasa_basis`). Stages are applied **sequentially on the running residual, in stored
order**; the composite x L, L = (I - U_1 U_1^T) ... (I - U_T U_T^T), is not an orthogonal projector in general and is
never replaced by one (``removal="joint"`` exists only as an ablation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ...eval.position import position_targets

ROW_TOL = 1e-12  # a regressor row with norm <= ROW_TOL is dropped (see docs/methods/rasa.md)
COL_TOL = 1e-6  # the Gram-Schmidt remainder of a row with norm <= COL_TOL is dropped (collinear rows)
ACTIVATIONS = ("sigmoid", "tanh", "identity")


class RASACheckpointError(ValueError):
    """A RASA head file or state dict is malformed (missing/gapped keys, wrong shapes, D mismatch)."""


# --------------------------------------------------------------------------------------------- core maths
def orthonormal_basis(rows: torch.Tensor, row_tol: float = ROW_TOL, col_tol: float = COL_TOL
                      ) -> tuple[torch.Tensor, bool]:
    """Gram-Schmidt over ``rows`` (k, D) in the given order, in fp64, with the tolerances of docs/methods/rasa.md.

    Each row is normalised first, then orthogonalised against the kept vectors (twice, for stability); rows with
    norm <= ``row_tol`` or remainder <= ``col_tol`` are dropped. Returns (U (D, r) fp64, degenerate) where
    ``degenerate`` tells whether any row was dropped.
    """
    w = rows.detach().to(device="cpu", dtype=torch.float64)
    kept: list[torch.Tensor] = []
    degenerate = False
    for v in w:
        n = v.norm()
        if not torch.isfinite(n):
            raise ValueError("RASA regressor rows contain NaN/inf; the head file is corrupt")
        if n <= row_tol:
            degenerate = True
            continue
        v = v / n
        for _ in range(2):
            for u in kept:
                v = v - (v @ u) * u
        r = v.norm()
        if r <= col_tol:
            degenerate = True
            continue
        kept.append(v / r)
    U = torch.stack(kept, 1) if kept else w.new_zeros(w.shape[1], 0)
    return U, degenerate


def rasa_basis(weight: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis U (D, r <= 2), fp64, of span(W) for one stage W (2, D), row regressor first."""
    if weight.ndim != 2 or weight.shape[0] != 2:
        raise ValueError(f"a RASA stage regressor has shape (2, D), got {tuple(weight.shape)}")
    return orthonormal_basis(weight)[0]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype RASA computes in for tokens ``x``: fp64 stays fp64, everything else (fp16/bf16/fp32) is fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def project_off(x2: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """x2 (M, D) minus its projection on span(U) (D, r): x - (x U) U^T (one addmm, no per-token copies)."""
    if U.shape[1] == 0:
        return x2
    return torch.addmm(x2, x2 @ U, U.T, alpha=-1.0)


def remove(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-stage removal: (x_pos, x_nopos) with x_pos = (x U) U^T, x_nopos = x - x_pos (shapes of ``x``)."""
    dt = compute_dtype(x)
    U = rasa_basis(weight).to(device=x.device, dtype=dt)
    x2 = x.to(dt).reshape(-1, x.shape[-1])
    nopos = project_off(x2, U)
    pos = x2 - nopos
    return pos.reshape(x.shape).to(x.dtype), nopos.reshape(x.shape).to(x.dtype)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The probe activation ``activation`` (one of :data:`ACTIVATIONS`) applied to logits ``z``."""
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "identity":
        return z
    raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")


# --------------------------------------------------------------------------------------------- targets, loss
def flat_position_targets(h: int, w: int, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, 2) targets of a row-major h x w grid: :func:`dinokit.eval.position.position_targets` flattened
    (channel 0 = row i/(h-1), 1 = column j/(w-1)), computed in fp32 and then moved to ``device``/``dtype``."""
    return position_targets(h, w).to(device=device, dtype=dtype).reshape(h * w, 2)


def probe_mse(x: torch.Tensor, weight: torch.Tensor, activation: str = "sigmoid") -> torch.Tensor:
    """Mean over all B*N*2 entries of (act(x W^T) - y)^2 for tokens x (B, h, w, D) and W (2, D)."""
    if x.ndim != 4:
        raise ValueError(f"expected tokens (B, h, w, D), got {tuple(x.shape)}")
    y = flat_position_targets(x.shape[1], x.shape[2], x.device)
    pred = activate(x.float().reshape(x.shape[0], -1, x.shape[-1]) @ weight.float().T, activation)
    return (pred - y).pow(2).mean()


def init_probe(embed_dim: int, seed: int) -> torch.Tensor:
    """A fresh (2, D) regressor, entries U(-1/sqrt(D), 1/sqrt(D)) from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(embed_dim)
    return (torch.rand(2, embed_dim, generator=g, dtype=torch.float32) * 2 - 1) * bound


# --------------------------------------------------------------------------------------------- the head
class RASAHead(nn.Module):
    """Sequential multi-stage RASA head (the reference implementation).

    Args:
        embed_dim: token dimension D.
        activation: probe activation for prediction/training (removal always uses the raw rows).
        stage_weights: optional (T, 2, D) frozen stage regressors, in application order.
        removal: ``"sequential"`` (the method) or ``"joint"`` (ablation: one projection off all 2T rows).

    Buffers: ``stage_weights`` (T, 2, D) fp32. While a stage is being trained, ``probe`` is a (2, D) Parameter.
    """

    def __init__(self, embed_dim: int, activation: str = "sigmoid", stage_weights: torch.Tensor | None = None,
                 removal: str = "sequential"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")
        if removal not in ("sequential", "joint"):
            raise ValueError(f"removal={removal!r}; choose 'sequential' (default) or 'joint' (ablation)")
        self.embed_dim, self.activation, self.removal = int(embed_dim), activation, removal
        sw = torch.zeros(0, 2, self.embed_dim) if stage_weights is None else stage_weights.detach().float().clone()
        if sw.ndim != 3 or sw.shape[1:] != (2, self.embed_dim):
            raise ValueError(f"stage_weights must be (T, 2, {self.embed_dim}), got {tuple(sw.shape)}")
        self.register_buffer("stage_weights", sw.contiguous())
        self.probe: nn.Parameter | None = None
        self._cache: dict = {}
        self._warned = False
        self.meta: dict[str, object] = {}

    @property
    def n_stages(self) -> int:
        return int(self.stage_weights.shape[0])

    # ------------------------------------------------------------------ bases (fp64, cached)
    def _key(self) -> tuple:
        sw = self.stage_weights
        return (sw.data_ptr(), sw._version, tuple(sw.shape))

    def bases64(self) -> list[torch.Tensor]:
        """Per-stage orthonormal bases U_t (D, r_t <= 2) in fp64 on CPU, computed once per weights version."""
        key = ("bases", self._key())
        if key not in self._cache:
            self._cache.clear()
            out, degenerate = [], False
            for W in self.stage_weights:
                U, d = orthonormal_basis(W)
                out.append(U)
                degenerate |= d
            if degenerate and not self._warned:
                warnings.warn("RASA head has a zero or collinear regressor row: the affected stage removes fewer "
                              "than 2 directions (rank reduced instead of NaN, see docs/methods/rasa.md)",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            self._cache[key] = out
        return self._cache[key]

    def _bases(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        key = ("bases", self._key(), device, dtype)
        if key not in self._cache:
            self._cache[key] = [U.to(device=device, dtype=dtype) for U in self.bases64()]
        return self._cache[key]

    def joint_basis64(self, n_stages: int | None = None) -> torch.Tensor:
        """(D, r <= 2n) orthonormal basis of span{all rows of stages 1..n}, Gram-Schmidt in stage order (fp64)."""
        n = self.n_stages if n_stages is None else n_stages
        return orthonormal_basis(self.stage_weights[:n].reshape(-1, self.embed_dim))[0]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"RASA head has embed_dim {self.embed_dim} but the tokens have D = {x.shape[-1]} "
                             f"(shape {tuple(x.shape)}); use a head fitted on this backbone")

    def _n(self, n_stages: int | None) -> int:
        n = self.n_stages if n_stages is None else int(n_stages)
        if not 0 <= n <= self.n_stages:
            raise ValueError(f"n_stages={n_stages} outside [0, {self.n_stages}] for this head")
        return n

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, n_stages: int | None = None, return_removed: bool = False,
                return_components: bool = False):
        """Debias tokens x (..., D) (e.g. (B, h, w, D) or (B, N, D)) with the first ``n_stages`` stages.

        Returns x^(n); with ``return_removed`` (x^(n), x - x^(n)); with ``return_components``
        (x^(n), removed_total = x - x^(n), removed_last = the part removed by stage n, zeros if n = 0).
        fp16/bf16 inputs are processed in fp32 and cast back; fp64 stays fp64.
        """
        self._check(x)
        n = self._n(n_stages)
        dt = compute_dtype(x)
        x2 = x.to(dt).reshape(-1, self.embed_dim)
        prev = x2
        if self.removal == "joint":
            out = project_off(x2, self.joint_basis64(n).to(device=x.device, dtype=dt)) if n else x2
        else:
            out = x2
            for U in self._bases(x.device, dt)[:n]:
                prev = out
                out = project_off(out, U)
        res = out.reshape(x.shape).to(x.dtype)
        if not (return_removed or return_components):
            return res
        removed = (x2 - out).reshape(x.shape).to(x.dtype)
        if not return_components:
            return res, removed
        last = (prev - out) if (n and self.removal == "sequential") else (x2 - out if n else torch.zeros_like(x2))
        return res, removed, last.reshape(x.shape).to(x.dtype)

    def stage_input(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """x^(stage-1): the tokens stage ``stage`` (1-based) sees."""
        return self(x, n_stages=stage - 1)

    def predict_position(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """act(x^(t-1) W_t^T) (..., 2) for stage t (1-based); ``stage=None`` uses the probe on x^(T)."""
        if stage is None or stage == self.n_stages + 1:
            if self.probe is None:
                raise ValueError("no probe is being trained; pass stage=1..T")
            return activate(self(x).float() @ self.probe.float().T, self.activation)
        if not 1 <= stage <= self.n_stages:
            raise ValueError(f"stage={stage} outside [1, {self.n_stages}]")
        return activate(self.stage_input(x, stage).float() @ self.stage_weights[stage - 1].float().T,
                        self.activation)

    # ------------------------------------------------------------------ training hooks
    def new_probe(self, seed: int) -> nn.Parameter:
        """Create the trainable (2, D) ``probe`` of the next stage (init seeded by ``seed``)."""
        self.probe = nn.Parameter(init_probe(self.embed_dim, seed).to(self.stage_weights.device))
        return self.probe

    def append_stage(self, weight: torch.Tensor) -> None:
        """Freeze ``weight`` (2, D) as the next stage (appended after the existing ones)."""
        w = weight.detach().float().reshape(1, 2, self.embed_dim).to(self.stage_weights.device)
        self.stage_weights = torch.cat([self.stage_weights, w]).contiguous()
        self._cache.clear()

    def commit_probe(self) -> None:
        """Append the trained probe to ``stage_weights`` and drop it."""
        if self.probe is None:
            raise ValueError("no probe to commit")
        self.append_stage(self.probe.data)
        self.probe = None

    def truncated(self, n_stages: int) -> RASAHead:
        """A new head with the first ``n_stages`` stages."""
        return RASAHead(self.embed_dim, self.activation, self.stage_weights[:self._n(n_stages)].cpu(), self.removal)

    # ------------------------------------------------------------------ folding
    def fold(self, mode: str = "auto") -> FoldedRASA:
        """The exact folded operator (dense L and compact low-rank forms) of the sequential head."""
        if self.removal == "joint":
            Q = self.joint_basis64()
            return FoldedRASA.from_bases(self.embed_dim, [Q], mode=mode, n_stages=self.n_stages)
        return FoldedRASA.from_bases(self.embed_dim, self.bases64(), mode=mode, n_stages=self.n_stages)

    # ------------------------------------------------------------------ checkpoints (dinokit.methods.rasa.checkpoint)
    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        """Franca's format: ``pre_pos_layers.{i}.weight`` (i = 0..T-2) then ``pos_pred.weight``, fp32 CPU (2, D)."""
        from .checkpoint import upstream_state_dict  # checkpoint.py imports this module

        return upstream_state_dict(self)

    def save(self, path: str | Path, format: str = "upstream", metadata: dict | None = None) -> Path:
        """Write the head atomically: ``upstream`` (torch.save flat dict) or ``native`` (safetensors + metadata)."""
        from .checkpoint import save_head  # checkpoint.py imports this module

        return save_head(self, path, format, metadata)


# --------------------------------------------------------------------------------------------- folded operator
class FoldedRASA(nn.Module):
    """Exact folded form of a sequential head: y = x L = x - ((x Q) G) Q^T (see docs/methods/rasa.md).

    L (D, D) = prod_t (I - U_t U_t^T); Q (D, R) = [U_1 ... U_T]; G (R, R) = (I + N)^-1 with N the strictly
    block-upper-triangular part of Q^T Q. ``mode``: ``"lowrank"``, ``"dense"`` or ``"auto"`` (low-rank when 8T < D).
    Operators are kept in fp64 on CPU and cached per (device, compute dtype); they are not module buffers, so casting
    a backbone that carries this transform never degrades them.
    """

    def __init__(self, L: torch.Tensor, Q: torch.Tensor, G: torch.Tensor, n_stages: int, mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "lowrank", "dense"):
            raise ValueError(f"mode={mode!r}; choose 'auto', 'lowrank' or 'dense'")
        self.L64, self.Q64, self.G64 = (t.detach().to("cpu", torch.float64) for t in (L, Q, G))
        self.embed_dim, self.n_stages = int(L.shape[0]), int(n_stages)
        self.mode = mode
        self._cache: dict = {}

    @classmethod
    def from_bases(cls, D: int, bases: list[torch.Tensor], mode: str = "auto", n_stages: int | None = None
                   ) -> FoldedRASA:
        eye = torch.eye(D, dtype=torch.float64)
        L = eye.clone()
        for U in bases:
            L = L - (L @ U) @ U.T  # L (I - U U^T)
        Q = torch.cat(bases, 1) if bases else torch.zeros(D, 0, dtype=torch.float64)
        R = Q.shape[1]
        N = torch.zeros(R, R, dtype=torch.float64)
        starts = [0]
        for U in bases:
            starts.append(starts[-1] + U.shape[1])
        QtQ = Q.T @ Q
        for t in range(len(bases)):
            N[:starts[t], starts[t]:starts[t + 1]] = QtQ[:starts[t], starts[t]:starts[t + 1]]
        I_R = torch.eye(R, dtype=torch.float64)
        G = torch.linalg.solve_triangular(I_R + N, I_R, upper=True) if R else I_R
        return cls(L, Q, G, len(bases) if n_stages is None else n_stages, mode)

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "lowrank" if 8 * self.n_stages < self.embed_dim else "dense"

    @property
    def L(self) -> torch.Tensor:
        return self.L64.float()

    @property
    def Q(self) -> torch.Tensor:
        return self.Q64.float()

    @property
    def G(self) -> torch.Tensor:
        return self.G64.float()

    def _ops(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype, self.resolved_mode)
        if key not in self._cache:
            if self.resolved_mode == "dense":
                self._cache[key] = (self.L64.to(device=device, dtype=dtype),)
            else:  # y = x - (xQ)(G Q^T)
                self._cache[key] = (self.Q64.to(device=device, dtype=dtype),
                                    (self.G64 @ self.Q64.T).to(device=device, dtype=dtype))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Debias tokens x (..., D); same shape and dtype (fp16/bf16 computed in fp32)."""
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"RASA operator has D = {self.embed_dim} but the tokens have D = {x.shape[-1]} "
                             f"(shape {tuple(x.shape)}); use a head fitted on this backbone")
        if self.Q64.shape[1] == 0:
            return x
        dt = compute_dtype(x)
        x2 = x.to(dt).reshape(-1, self.embed_dim)
        ops = self._ops(x.device, dt)
        y = x2 @ ops[0] if len(ops) == 1 else torch.addmm(x2, x2 @ ops[0], ops[1], alpha=-1.0)
        return y.reshape(x.shape).to(x.dtype)

    def save(self, path: str | Path) -> Path:
        """Write L, Q, G (fp32 safetensors, atomically) for deployment; one-way (stages are not recoverable)."""
        from safetensors.torch import save_file

        from ...io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({"L": self.L.contiguous(), "Q": self.Q.contiguous(), "G": self.G.contiguous()}, str(tmp),
                      metadata={"format": "dinokit-rasa-folded", "n_stages": str(self.n_stages),
                                "embed_dim": str(self.embed_dim)})
        return path

    @classmethod
    def load(cls, path: str | Path, mode: str = "auto") -> FoldedRASA:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("format") != "dinokit-rasa-folded":
                raise RASACheckpointError(f"{path} is not a folded RASA operator (written by FoldedRASA.save)")
            return cls(f.get_tensor("L"), f.get_tensor("Q"), f.get_tensor("G"), int(md["n_stages"]), mode)


# --------------------------------------------------------------------------------------------- integration
class RASATransform(nn.Module):
    """``DenseFeatures`` -> ``DenseFeatures`` with debiased ``patch``; CLS, registers and grid untouched.

    Accepts a :class:`RASAHead` (folded on construction) or a :class:`FoldedRASA`. A plain tensor (..., D) is
    debiased directly.
    """

    def __init__(self, head_or_folded: RASAHead | FoldedRASA, mode: str = "auto"):
        super().__init__()
        op = head_or_folded.fold(mode) if isinstance(head_or_folded, RASAHead) else head_or_folded
        if not isinstance(op, FoldedRASA):
            raise TypeError(f"RASATransform needs a RASAHead or FoldedRASA, got {type(head_or_folded).__name__}")
        self.op = op

    @property
    def embed_dim(self) -> int:
        return self.op.embed_dim

    def forward(self, feats):
        if isinstance(feats, torch.Tensor):
            return self.op(feats)
        if feats.patch.shape[-1] != self.op.embed_dim:
            raise ValueError(f"RASA head has D = {self.op.embed_dim} but these features have D = "
                             f"{feats.patch.shape[-1]}; use a head fitted on this backbone")
        return replace(feats, patch=self.op(feats.patch))

    def extra_repr(self) -> str:
        return f"D={self.op.embed_dim}, stages={self.op.n_stages}, mode={self.op.resolved_mode}"
