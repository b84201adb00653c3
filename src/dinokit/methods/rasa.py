"""RASA: Removal of Absolute Spatial Attributes (spec ``shared/spec/rasa.md``), pure torch.

A stage t holds a bias-free regressor W_t (2, D) (row 0 predicts a token's row, row 1 its column, both in [0, 1]
through a sigmoid). Its removal projects every token off span(W_t), with the basis built by Gram-Schmidt with the
row regressor first (:func:`rasa_basis`). Stages are applied **sequentially on the running residual, in stored
order**; the composite x L, L = (I - U_1 U_1^T) ... (I - U_T U_T^T), is not an orthogonal projector in general and is
never replaced by one (``removal="joint"`` exists only as an ablation).

Contents: :func:`rasa_basis`, :func:`remove`, :class:`RASAHead` (reference, trainable probe), :class:`FoldedRASA`
(exact folded operator for inference), :class:`RASATransform` (a ``DenseFeatures`` transform), checkpoint I/O in the
upstream (Franca) and native formats, :func:`attach_rasa`, position targets / chance level, and the pure-torch
stage loop (:func:`run_stages`, :func:`fit_rasa_features`). The thin Lightning trainer on a frozen backbone is
:mod:`dinokit.methods.rasa_train`; the commands are in :mod:`dinokit.methods.rasa_commands`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ROW_TOL = 1e-12  # a regressor row with norm <= ROW_TOL is dropped (spec §3)
COL_TOL = 1e-6  # the Gram-Schmidt remainder of a row with norm <= COL_TOL is dropped (collinear rows)
ACTIVATIONS = ("sigmoid", "tanh", "identity")
UPSTREAM_PRE = re.compile(r"^pre_pos_layers\.(\d+)\.weight$")
UPSTREAM_LAST = "pos_pred.weight"
PREFIXES = ("module.", "rasa_head.", "head.")


class RASACheckpointError(ValueError):
    """A RASA head file or state dict is malformed (missing/gapped keys, wrong shapes, D mismatch)."""


# --------------------------------------------------------------------------------------------- core maths
def orthonormal_basis(rows: torch.Tensor, row_tol: float = ROW_TOL, col_tol: float = COL_TOL
                      ) -> tuple[torch.Tensor, bool]:
    """Gram-Schmidt over ``rows`` (k, D) in the given order, in fp64, with the spec §3 tolerances.

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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _project_off(x2: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """x2 (M, D) minus its projection on span(U) (D, r): x - (x U) U^T (one addmm, no per-token copies)."""
    if U.shape[1] == 0:
        return x2
    return torch.addmm(x2, x2 @ U, U.T, alpha=-1.0)


def remove(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-stage removal: (x_pos, x_nopos) with x_pos = (x U) U^T, x_nopos = x - x_pos (shapes of ``x``)."""
    dt = _compute_dtype(x)
    U = rasa_basis(weight).to(device=x.device, dtype=dt)
    x2 = x.to(dt).reshape(-1, x.shape[-1])
    nopos = _project_off(x2, U)
    pos = x2 - nopos
    return pos.reshape(x.shape).to(x.dtype), nopos.reshape(x.shape).to(x.dtype)


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "identity":
        return z
    raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")


# --------------------------------------------------------------------------------------------- targets, chance
def position_targets(h: int, w: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, 2) targets (i/(h-1), j/(w-1)) for a row-major h x w grid; channel 0 = row, 1 = column."""
    if h < 2 or w < 2:
        raise ValueError(f"position targets need a grid of at least 2x2 tokens, got {h}x{w}; use larger inputs")
    i = torch.arange(h, device=device, dtype=dtype) / (h - 1)
    j = torch.arange(w, device=device, dtype=dtype) / (w - 1)
    return torch.stack(torch.meshgrid(i, j, indexing="ij"), -1).reshape(h * w, 2)


def chance_mse(h: int, w: int) -> float:
    """MSE of the best constant (0.5) on the targets of an h x w grid: the target variance (spec §6)."""
    if h < 2 or w < 2:
        raise ValueError(f"chance level needs a grid of at least 2x2 tokens, got {h}x{w}")
    return 0.5 * ((h + 1) / (12 * (h - 1)) + (w + 1) / (12 * (w - 1)))


def probe_mse(x: torch.Tensor, weight: torch.Tensor, activation: str = "sigmoid") -> torch.Tensor:
    """Mean over all B*N*2 entries of (act(x W^T) - y)^2 for tokens x (B, h, w, D) and W (2, D)."""
    if x.ndim != 4:
        raise ValueError(f"expected tokens (B, h, w, D), got {tuple(x.shape)}")
    y = position_targets(x.shape[1], x.shape[2], x.device, torch.float32)
    pred = _activate(x.float().reshape(x.shape[0], -1, x.shape[-1]) @ weight.float().T, activation)
    return (pred - y).pow(2).mean()


def init_probe(embed_dim: int, seed: int) -> torch.Tensor:
    """A fresh (2, D) regressor, entries U(-1/sqrt(D), 1/sqrt(D)) from a generator seeded ``seed`` (spec §7)."""
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
                              "than 2 directions (rank reduced instead of NaN, spec §3)", RuntimeWarning, stacklevel=3)
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
        dt = _compute_dtype(x)
        x2 = x.to(dt).reshape(-1, self.embed_dim)
        prev = x2
        if self.removal == "joint":
            out = _project_off(x2, self.joint_basis64(n).to(device=x.device, dtype=dt)) if n else x2
        else:
            out = x2
            for U in self._bases(x.device, dt)[:n]:
                prev = out
                out = _project_off(out, U)
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
            return _activate(self(x).float() @ self.probe.float().T, self.activation)
        if not 1 <= stage <= self.n_stages:
            raise ValueError(f"stage={stage} outside [1, {self.n_stages}]")
        return _activate(self.stage_input(x, stage).float() @ self.stage_weights[stage - 1].float().T,
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
        """The exact folded operator (dense L and compact low-rank forms) of the sequential head (spec §5)."""
        if self.removal == "joint":
            Q = self.joint_basis64()
            return FoldedRASA.from_bases(self.embed_dim, [Q], mode=mode, n_stages=self.n_stages)
        return FoldedRASA.from_bases(self.embed_dim, self.bases64(), mode=mode, n_stages=self.n_stages)

    # ------------------------------------------------------------------ checkpoints
    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        """Franca's format: ``pre_pos_layers.{i}.weight`` (i = 0..T-2) then ``pos_pred.weight``, fp32 CPU (2, D)."""
        if self.n_stages == 0:
            raise RASACheckpointError("cannot write a RASA head with 0 stages in the upstream format")
        sw = self.stage_weights.detach().float().cpu()
        sd = {f"pre_pos_layers.{i}.weight": sw[i].clone() for i in range(self.n_stages - 1)}
        sd[UPSTREAM_LAST] = sw[-1].clone()
        return sd

    def save(self, path: str | Path, format: str = "upstream", metadata: dict | None = None) -> Path:
        """Write the head atomically: ``upstream`` (torch.save flat dict) or ``native`` (safetensors + metadata)."""
        from ..io import atomic_path

        path = Path(path)
        sd = self.upstream_state_dict()
        with atomic_path(path) as tmp:
            if format == "upstream":
                torch.save(sd, tmp)
            elif format == "native":
                from safetensors.torch import save_file

                from .. import __version__

                md = {"dinokit_version": __version__, "embed_dim": str(self.embed_dim),
                      "n_stages": str(self.n_stages), "activation": self.activation}
                md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in {**self.meta,
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


# --------------------------------------------------------------------------------------------- folded operator
class FoldedRASA(nn.Module):
    """Exact folded form of a sequential head: y = x L = x - ((x Q) G) Q^T (spec §5).

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
            else:  # y = x - (x Q)(G Q^T)
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
        dt = _compute_dtype(x)
        x2 = x.to(dt).reshape(-1, self.embed_dim)
        ops = self._ops(x.device, dt)
        y = x2 @ ops[0] if len(ops) == 1 else torch.addmm(x2, x2 @ ops[0], ops[1], alpha=-1.0)
        return y.reshape(x.shape).to(x.dtype)

    def save(self, path: str | Path) -> Path:
        """Write L, Q, G (fp32 safetensors, atomically) for deployment; one-way (stages are not recoverable)."""
        from safetensors.torch import save_file

        from ..io import atomic_path

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


def attach_rasa(backbone, path_or_head: str | Path | RASAHead | FoldedRASA, mode: str = "auto"):
    """Set ``backbone.feature_transform`` to a :class:`RASATransform` (every consumer then sees debiased patch
    tokens). ``path_or_head``: a head file (upstream or native), a :class:`RASAHead` or :class:`FoldedRASA`.
    Raises if the head's D differs from ``backbone.embed_dim``. Returns the backbone."""
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


# --------------------------------------------------------------------------------------------- stage loop
@dataclass
class StageRecord:
    """Validation of the fresh probe of stage ``stage`` and whether it was committed."""

    stage: int
    mse: float
    chance: float
    committed: bool
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def r2(self) -> float:
        return 1.0 - self.mse / self.chance

    def flat(self, prefix: str = "rasa") -> dict[str, float]:
        p = f"{prefix}/stage{self.stage}"
        out = {f"{p}/val/mse": self.mse, f"{p}/val/chance": self.chance, f"{p}/val/r2": self.r2,
               f"{p}/committed": int(self.committed)}
        out.update({f"{p}/{k}": v for k, v in self.metrics.items()})
        return out


@dataclass
class RASAFitResult:
    head: RASAHead
    records: list[StageRecord]
    stop_reason: str

    def summary(self, prefix: str = "rasa") -> dict[str, float | int | str]:
        """Flat result dict: per-stage keys, ``rasa/n_stages``, ``rasa/stop_reason``, ``rasa/final/val/*``."""
        out: dict[str, float | int | str] = {}
        for r in self.records:
            out.update(r.flat(prefix))
        out[f"{prefix}/n_stages"] = self.head.n_stages
        out[f"{prefix}/stop_reason"] = self.stop_reason
        if self.records:
            last = self.records[-1]  # the probe on x^(T): the audit / rejected probe when there is one
            out[f"{prefix}/final/val/mse"] = last.mse
            out[f"{prefix}/final/val/r2"] = last.r2
            out[f"{prefix}/final/val/audit_is_committed"] = int(last.committed)
        return out


def _write_progress(out_dir: Path, head: RASAHead, records: list[StageRecord], done: str | None) -> None:
    from ..io import atomic_write_text

    payload = {"n_stages": head.n_stages, "embed_dim": head.embed_dim, "stop_reason": done,
               "records": [{"stage": r.stage, "mse": r.mse, "chance": r.chance, "committed": r.committed,
                            "metrics": r.metrics} for r in records]}
    atomic_write_text(out_dir / "progress.json", json.dumps(payload, indent=1))


def read_progress(out_dir: Path) -> tuple[RASAHead | None, list[StageRecord], str | None]:
    """Resume state of a stage directory: the head of the last finished stage, its records, the stop reason."""
    p = out_dir / "progress.json"
    if not p.is_file():
        return None, [], None
    state = json.loads(p.read_text())
    recs = [StageRecord(r["stage"], r["mse"], r["chance"], r["committed"], r.get("metrics", {}))
            for r in state["records"]]
    T = int(state["n_stages"])
    head = RASAHead(int(state["embed_dim"]))
    if T:
        ck = out_dir / f"stage{T:02d}.pth"
        head = load_rasa_head(ck, embed_dim=int(state["embed_dim"]))
        if head.n_stages != T:
            raise RASACheckpointError(f"{ck} holds {head.n_stages} stages but {p} says {T}; delete the folder to "
                                      "restart")
    return head, recs, state.get("stop_reason")


def run_stages(head: RASAHead, train_probe: Callable[[RASAHead, int], None],
               validate: Callable[[RASAHead, int], StageRecord], *, stopping: str = "fixed",
               max_stages: int | None = None, min_stages: int = 1, rtol: float = 0.05, audit: bool = True,
               seed: int = 400, out_dir: Path | None = None, resume: bool = True,
               on_record: Callable[[StageRecord], None] | None = None) -> RASAFitResult:
    """The stage loop of spec §7/§9, independent of how a probe is trained.

    ``train_probe(head, t)`` trains ``head.probe`` (created here, seeded ``seed + t``) on x^(t-1);
    ``validate(head, t)`` returns the fresh probe's :class:`StageRecord`. With ``out_dir`` each committed stage is
    written atomically as ``stage{t:02d}.pth`` (upstream format) plus ``progress.json``; ``resume`` restarts from
    the last finished stage. Returns the head (committed stages only), the records and the stop reason.
    """
    if stopping not in ("fixed", "chance"):
        raise ValueError(f"stopping={stopping!r}; choose 'fixed' (exactly max_stages) or 'chance'")
    max_stages = (9 if stopping == "fixed" else 22) if max_stages is None else int(max_stages)
    if max_stages < 1 or min_stages < 0:
        raise ValueError(f"max_stages must be >= 1 and min_stages >= 0, got {max_stages}, {min_stages}")
    records: list[StageRecord] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            prev, recs, done = read_progress(out_dir)
            if prev is not None:
                if prev.embed_dim != head.embed_dim:
                    raise RASACheckpointError(f"{out_dir} holds a head with D = {prev.embed_dim}, not "
                                              f"{head.embed_dim}; use another --out")
                head.stage_weights = prev.stage_weights.to(head.stage_weights.device)
                head._cache.clear()
                records = recs
                if done == "chance" or (done is not None and head.n_stages >= max_stages):
                    log.info("%s: already finished (%s, %d stages)", out_dir, done, head.n_stages)
                    return RASAFitResult(head, records, done)
                log.info("%s: resuming after stage %d", out_dir, head.n_stages)
    # records of probes that were trained after the last commit but not committed are redone
    records = [r for r in records if r.committed]

    def one(t: int) -> StageRecord:
        head.new_probe(seed + t)
        train_probe(head, t)
        rec = validate(head, t)
        if on_record is not None:
            on_record(rec)
        return rec

    reason = "max_stages"
    while head.n_stages < max_stages:
        t = head.n_stages + 1
        rec = one(t)
        at_chance = rec.mse >= (1.0 - rtol) * rec.chance
        if stopping == "chance" and at_chance and t > min_stages:
            records.append(rec)
            reason = "chance"
            head.probe = None
            break
        rec.committed = True
        records.append(rec)
        head.commit_probe()
        if out_dir is not None:
            head.save(out_dir / f"stage{t:02d}.pth")
            _write_progress(out_dir, head, records, None)
    if reason == "max_stages" and audit:
        rec = one(head.n_stages + 1)
        records.append(rec)
        head.probe = None
    if out_dir is not None:
        _write_progress(out_dir, head, records, reason)
    return RASAFitResult(head, records, reason)


# --------------------------------------------------------------------------------------------- feature-level fit
def cosine_lr(step: int, total: int) -> float:
    """Cosine factor from 1 to 0 over ``total`` optimiser steps (no warm-up)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_probe_on_batches(head: RASAHead, batches: Callable[[], Iterable[torch.Tensor]], steps: int, *,
                           lr: float = 2e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                           eps: float = 1e-8) -> list[float]:
    """Train ``head.probe`` with AdamW + per-step cosine to 0 on x^(T) of token batches (B, h, w, D).

    ``batches()`` yields batches (called again when exhausted). The committed stages are applied through the
    folded operator (identical to the sequential head). Returns the per-step losses.
    """
    if head.probe is None:
        raise ValueError("call head.new_probe(seed) first")
    folded = head.fold()
    opt = torch.optim.AdamW([head.probe], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    losses: list[float] = []
    it = iter(batches())
    while len(losses) < steps:
        try:
            x = next(it)
        except StopIteration:
            it = iter(batches())
            continue
        with torch.no_grad():
            h = folded(x.float())
        loss = probe_mse(h, head.probe, head.activation)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine a.b / max(|a||b|, 1e-8) over the last dim."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)


@torch.no_grad()
def validate_probe(head: RASAHead, stage: int, batches: Iterable[torch.Tensor],
                   pos_embed: Callable[[int, int], torch.Tensor | None] | None = None) -> StageRecord:
    """Fresh probe of ``stage`` (``head.probe``) on x^(stage-1) of validation batches (B, h, w, D).

    MSE and chance are accumulated over all targets (mixed grids allowed). With ``pos_embed(h, w) -> (h*w, D)``
    the spec §8 cosines are added: ``val/cos_pe_removed``, ``val/cos_pe_residual``, ``val/cos_x_removed``,
    ``val/cos_x_residual`` (removed = the part stage t removes, residual = x^(t)).
    """
    if head.probe is None:
        raise ValueError("no probe to validate")
    folded = head.fold()
    W = head.probe.detach().float()
    U = rasa_basis(W)
    se = sq0 = n = 0.0
    cos = {"cos_pe_removed": 0.0, "cos_pe_residual": 0.0, "cos_x_removed": 0.0, "cos_x_residual": 0.0}
    ntok = 0
    for x in batches:
        x = x.float()
        B, h, w, D = x.shape
        xp = folded(x)
        y = position_targets(h, w, x.device)
        pred = _activate(xp.reshape(B, h * w, D) @ W.to(x.device).T, head.activation)
        se += float((pred - y).pow(2).sum())
        sq0 += float((position_targets(h, w, dtype=torch.float64) - 0.5).pow(2).sum()) * B
        n += B * h * w * 2
        if pos_embed is not None:
            pe = pos_embed(h, w)
            if pe is not None:
                x2 = xp.reshape(-1, D)
                resid = _project_off(x2, U.to(x.device, torch.float32))
                removed = x2 - resid
                pe_b = pe.to(x.device).float().reshape(1, h * w, D).expand(B, -1, -1).reshape(-1, D)
                x0 = x.reshape(-1, D)
                cos["cos_pe_removed"] += float(token_cosine(pe_b, removed).sum())
                cos["cos_pe_residual"] += float(token_cosine(pe_b, resid).sum())
                cos["cos_x_removed"] += float(token_cosine(x0, removed).sum())
                cos["cos_x_residual"] += float(token_cosine(x0, resid).sum())
                ntok += x2.shape[0]
    if n == 0:
        raise ValueError("the validation set is empty")
    metrics = {f"val/{k}": v / ntok for k, v in cos.items()} if ntok else {}
    return StageRecord(stage, se / n, sq0 / n, False, metrics)


def fit_rasa_features(train: torch.Tensor, val: torch.Tensor, *, stopping: str = "fixed",
                      max_stages: int | None = None, min_stages: int = 1, rtol: float = 0.05, audit: bool = True,
                      steps: int = 500, batch_size: int = 32, lr: float = 2e-4, weight_decay: float = 0.0,
                      seed: int = 400, out_dir: Path | None = None, resume: bool = True,
                      train_views: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                      pos_embed: Callable[[int, int], torch.Tensor | None] | None = None,
                      on_record: Callable[[StageRecord], None] | None = None,
                      activation: str = "sigmoid") -> RASAFitResult:
    """Fit a RASA head on precomputed tokens: ``train`` (M, h, w, D), ``val`` (V, h', w', D).

    Each stage trains a fresh probe for ``steps`` AdamW steps on shuffled batches of ``batch_size`` images
    (order seeded ``seed + t``), optionally through ``train_views(batch, generator)``. Content-position
    decorrelation must happen on the images (flips/rotations before the backbone, e.g. several augmented views per
    image): flipping a token grid would move the position embedding with the token and destroy the very signal
    being removed. The stopping rule, audit and checkpoints are those of :func:`run_stages`.
    """
    if train.ndim != 4 or val.ndim != 4:
        raise ValueError(f"train/val tokens must be (M, h, w, D), got {tuple(train.shape)} and {tuple(val.shape)}")
    if train.shape[-1] != val.shape[-1]:
        raise ValueError(f"train D = {train.shape[-1]} but val D = {val.shape[-1]}")
    head = RASAHead(train.shape[-1], activation)

    def train_probe(h: RASAHead, t: int) -> None:
        g = torch.Generator().manual_seed(seed + 1000 * t)

        def batches():
            perm = torch.randperm(train.shape[0], generator=g)
            for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
                b = train[perm[i:i + batch_size]]
                yield b if train_views is None else train_views(b, g)

        train_probe_on_batches(h, batches, steps, lr=lr, weight_decay=weight_decay)

    def validate(h: RASAHead, t: int) -> StageRecord:
        return validate_probe(h, t, (val[i:i + 256] for i in range(0, val.shape[0], 256)), pos_embed)

    return run_stages(head, train_probe, validate, stopping=stopping, max_stages=max_stages, min_stages=min_stages,
                      rtol=rtol, audit=audit, seed=seed, out_dir=out_dir, resume=resume, on_record=on_record)


def stage_curve(records: list[StageRecord], path_png: Path, path_json: Path, title: str = "RASA") -> None:
    """Write the per-stage validation curve (MSE of each fresh probe vs chance) as a PNG and a JSON file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_text
    from ..viz.maps import save_figure

    st = [r.stage for r in records]
    payload = {"stage": st, "mse": [r.mse for r in records], "chance": [r.chance for r in records],
               "r2": [r.r2 for r in records], "committed": [r.committed for r in records],
               "metrics": [r.metrics for r in records]}
    atomic_write_text(path_json, json.dumps(payload, indent=1))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(st, payload["mse"], "o-", label="fresh probe val MSE")
    ax.plot(st, payload["chance"], "k--", label="chance")
    for r in records:
        if not r.committed:
            ax.plot([r.stage], [r.mse], "rx", ms=9)
    ax.set_xlabel("stage t (probe on x^(t-1); x = not committed)")
    ax.set_ylabel("position MSE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path_png, dpi=110)
