"""Barlow Twins for ViTs (and ResNets): loss, projector, two-view augmentations, global-batch DDP. Pure torch.

``BarlowTwinsLoss``, ``Projector``, ``BarlowTwins``, ``gather_batch``, ``GatheredBatchNorm``, ``TwoViews`` and the
views; the optimiser pieces (``LARS``, the warm-up + cosine schedule, parameter groups) live in
:mod:`dinokit.methods.training`, the Lightning module in :mod:`dinokit.methods.barlow_twins.lightning`.
See docs/methods/barlow_twins.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..training import LARS, cosine_schedule
from ..training import param_groups as _param_groups

__all__ = ["LARS", "BarlowTwins", "BarlowTwinsLoss", "GatheredBatchNorm", "Projector", "TwoViews", "barlow_twins_views",
           "convert_batchnorm", "cross_correlation", "gather_batch", "off_diagonal", "param_groups",
           "parse_projector_dims", "standardize", "warmup_cosine"]

PROJECTOR_PRESETS: dict[str, str] = {"official": "8192-8192-8192", "small": "512-512-512"}
NORMS = ("batchnorm", "unbiased")
POOLS = ("cls", "mean")


# ---------------------------------------------------------------------------------------------- loss
def standardize(z: torch.Tensor, norm: str = "batchnorm", eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension batch standardisation of (B, D) embeddings.

    ``"batchnorm"``: (z - mu) / sqrt(var_b + eps) with the biased variance (BatchNorm1d(affine=False), training
    mode); ``"unbiased"``: the same with the (B - 1)-normalised variance (RecvisProject; eps=0 for parity).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; choose one of {NORMS}")
    if z.ndim != 2:
        raise ValueError(f"expected embeddings (B, D), got shape {tuple(z.shape)}")
    B = z.shape[0]
    if B < 2:
        raise ValueError(f"Barlow Twins needs a batch of at least 2 samples to standardise each dimension over the "
                         f"batch, got B={B}; increase batch_size (a global batch >= 256 is recommended)")
    zc = z - z.mean(0, keepdim=True)
    var = zc.pow(2).sum(0, keepdim=True) / (B if norm == "batchnorm" else B - 1)
    return zc / torch.sqrt(var + eps)


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The D*(D-1) off-diagonal entries of a square (D, D) matrix, as a flat view-based tensor."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, norm: str = "batchnorm",
                      eps: float = 1e-5) -> torch.Tensor:
    """C = z~_A^T z~_B / B, (D, D), of the standardised (fp32) embeddings."""
    if z_a.shape != z_b.shape:
        raise ValueError(f"the two views' embeddings differ in shape: {tuple(z_a.shape)} vs {tuple(z_b.shape)}")
    dtype = torch.float64 if z_a.dtype == torch.float64 else torch.float32
    a = standardize(z_a.to(dtype), norm, eps)
    b = standardize(z_b.to(dtype), norm, eps)
    return a.T @ b / z_a.shape[0]


class BarlowTwinsLoss(nn.Module):
    """L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 on (B, D) projector outputs (always fp32 or fp64).

    After each call: ``last_c`` (D, D) detached fp32 copy of C (diagonal intact), ``last_terms`` with the
    ``on_diag`` and ``off_diag`` sums, ``rank_bound`` = min(B - 1, D) / D. The batch passed in is the global
    batch (gather it first under DDP, see :func:`gather_batch`); a batch below 64 warns once.
    """

    def __init__(self, lambd: float = 0.0051, norm: str = "batchnorm", eps: float = 1e-5, warn_batch: int = 64):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}; choose one of {NORMS}")
        if lambd < 0 or eps < 0:
            raise ValueError(f"lambd and eps must be >= 0, got lambd={lambd}, eps={eps}")
        self.lambd, self.norm, self.eps, self.warn_batch = float(lambd), norm, float(eps), warn_batch
        self.last_c: torch.Tensor | None = None
        self.last_terms: dict[str, torch.Tensor] = {}
        self.rank_bound: float = 1.0
        self._warned = False

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        B, D = z_a.shape
        if B >= 2 and B < self.warn_batch and not self._warned:
            warnings.warn(f"Barlow Twins global batch B={B} < {self.warn_batch}: rank(C) <= B - 1, so at most "
                          f"{min(B - 1, D)}/{D} dimensions can be decorrelated; use a larger (global) batch",
                          stacklevel=2)
            self._warned = True
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            c = cross_correlation(z_a, z_b, self.norm, self.eps)
            on = (1.0 - torch.diagonal(c)).pow(2).sum()
            off = off_diagonal(c).pow(2).sum()
            loss = on + self.lambd * off
        self.last_c = c.detach().float().clone()
        self.last_terms = {"on_diag": on.detach(), "off_diag": off.detach()}
        self.rank_bound = min(B - 1, D) / D
        return loss


# ---------------------------------------------------------------------------------------------- projector
def parse_projector_dims(projector: str | Sequence[int]) -> list[int]:
    """``"official"`` | ``"small"`` | ``"a-b-c"`` | [a, b, c] -> list of positive widths."""
    if isinstance(projector, str):
        spec = PROJECTOR_PRESETS.get(projector, projector)
        try:
            dims = [int(s) for s in spec.split("-") if s.strip()]
        except ValueError:
            raise ValueError(f"projector={projector!r}: use 'official', 'small' or widths like '512-512-512'") from None
    else:
        dims = [int(d) for d in projector]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"projector={projector!r} gives widths {dims}: need at least one positive width, "
                         "e.g. '8192-8192-8192' (official) or '512-512-512' (small)")
    return dims


class Projector(nn.Sequential):
    """Linear(in, d1, bias=False) -> [BN1d -> ReLU -> Linear(bias=False)] x (n - 1); no final BN or ReLU.

    Parameters: in*d1 + sum_k (2 d_k + d_k d_{k+1}).  (B, in) -> (B, d_n).
    """

    def __init__(self, in_dim: int, projector: str | Sequence[int] = "official"):
        dims = parse_projector_dims(projector)
        if in_dim <= 0:
            raise ValueError(f"projector input width must be positive, got {in_dim}")
        layers: list[nn.Module] = [nn.Linear(in_dim, dims[0], bias=False)]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.BatchNorm1d(a), nn.ReLU(inplace=True), nn.Linear(a, b, bias=False)]
        super().__init__(*layers)
        self.in_dim, self.dims = in_dim, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"projector expects (B, {self.in_dim}) inputs, got {tuple(x.shape)}: the backbone's "
                             f"embedding width does not fit the projector input width {self.in_dim}")
        return super().forward(x)


# ---------------------------------------------------------------------------------------------- DDP helpers
def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """All-gather (B, ...) along the batch with gradient (``torch.distributed.nn``); identity outside DDP.

    Every rank then holds the global batch in rank order; the backward reduce-scatters (sums) the gradient, so
    with DDP's gradient averaging the parameters get exactly the gradient of the global-batch loss.
    """
    if _world() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z.contiguous()), dim=0)


class GatheredBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the global batch (all ranks) by a gradient-preserving all-gather; works on CPU (gloo)
    where ``nn.SyncBatchNorm`` does not. Identical to BatchNorm outside DDP or in eval mode. Any (B, C, ...)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(_world())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(f"GatheredBatchNorm needs equal per-rank batches, got {[int(s) for s in sizes]}; "
                             "use drop_last=True")
        full = gather_batch(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y = F.batch_norm(full, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)
        r = dist.get_rank()
        return y[r * x.shape[0]:(r + 1) * x.shape[0]]

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {x.ndim}-D")


def convert_batchnorm(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Make every BatchNorm of ``module`` global-batch: ``nn.SyncBatchNorm`` on CUDA, else GatheredBatchNorm."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GatheredBatchNorm):
        out = GatheredBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        ref = next(iter(module.parameters()), module.running_mean)
        if ref is not None:
            out = out.to(device=ref.device, dtype=ref.dtype)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, device_type))
    return out


# ---------------------------------------------------------------------------------------------- model
class BarlowTwins(nn.Module):
    """Backbone + projector + loss. ``forward(x1, x2)`` -> scalar loss over the global batch.

    ``backbone``: a dinokit ``Backbone`` (``forward_features`` -> DenseFeatures) or any module mapping images to
    (B, in) features. ``pool``: ``"cls"`` (final-norm CLS token) or ``"mean"`` (mean of final-norm patch tokens);
    ResNets always use the global average pool. ``projector_in``: expected input width (checked against the
    backbone's ``embed_dim``).
    """

    def __init__(self, backbone: nn.Module, projector: str | Sequence[int] = "small", pool: str = "cls",
                 lambd: float = 0.0051, norm: str = "batchnorm", eps: float = 1e-5,
                 projector_in: int | None = None, gather: bool = True):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}; choose one of {POOLS}")
        width = getattr(backbone, "embed_dim", None)
        if projector_in is None:
            if width is None:
                raise ValueError("backbone has no embed_dim; pass projector_in (its output width)")
            projector_in = int(width)
        elif width is not None and int(width) != projector_in:
            raise ValueError(f"projector input width {projector_in} does not fit the backbone's embedding width "
                             f"{width} ({getattr(backbone, 'name', type(backbone).__name__)}); "
                             f"use projector_in={width} or leave it unset")
        self.backbone, self.pool, self.gather = backbone, pool, gather
        self.projector = Projector(projector_in, projector)
        self.criterion = BarlowTwinsLoss(lambd, norm, eps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, in) pooled backbone features (never classifier logits)."""
        if not hasattr(self.backbone, "forward_features") or not hasattr(self.backbone, "patch_size"):
            return self.backbone(x)
        f = self.backbone.forward_features(x)
        if f.cls is None or self.pool == "mean":
            return f.patch.mean(dim=(1, 2))
        return f.cls

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.embed(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if x1.shape[0] < 2 and _world() == 1:
            raise ValueError(f"Barlow Twins needs a batch of at least 2 images (got {x1.shape[0]}): the projector's "
                             "BatchNorm and the loss standardise over the batch; increase batch_size")
        z1, z2 = self.project(x1), self.project(x2)
        if self.gather:
            z1, z2 = gather_batch(z1), gather_batch(z2)
        return self.criterion(z1, z2)


# ---------------------------------------------------------------------------------------------- optimisation
def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.001) -> float:
    """The Barlow Twins lr multiplier: linear warm-up from 0 over ``warmup`` steps, then
    q + final (1 - q) with q = (1 + cos(pi (t - T_w) / (T - T_w))) / 2; never restarts (clamped at the end).
    The Barlow Twins setting of :func:`dinokit.methods.training.cosine_schedule`."""
    return cosine_schedule(step, total, 1.0, final, warmup)


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None,
                 bias_lr: float | None = None) -> list[dict]:
    """Two groups: weights (decayed) and ndim <= 1 parameters (no decay, excluded from LARS adaptation).
    The Barlow Twins setting of :func:`dinokit.methods.training.param_groups`."""
    return _param_groups(module, weight_decay, lr, no_decay_lr=bias_lr)


# ---------------------------------------------------------------------------------------------- augmentations
def barlow_twins_views(augment: str = "official", size: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                       std: Sequence[float] = (0.229, 0.224, 0.225),
                       crop_scale: tuple[float, float] = (0.08, 1.0)) -> tuple[Callable, Callable]:
    """The two asymmetric torchvision-v2 pipelines (view 1: blur p=1.0, no solarize; view 2: blur p=0.1,
    solarize p=0.2). Inputs: PIL images, uint8 (H, W, 3) arrays or uint8 tensors; outputs normalised (3, S, S).

    ``augment="official"``: RandomResizedCrop(size, crop_scale, bicubic); ``"recvis"``: a square Resize first,
    blur sigma in [0.1, 0.2].
    """
    import torchvision.transforms.v2 as T

    if augment not in ("official", "recvis"):
        raise ValueError(f"augment={augment!r}; choose 'official' or 'recvis'")
    sigma = (0.1, 2.0) if augment == "official" else (0.1, 0.2)
    kernel = 2 * math.ceil(3 * sigma[1] * size / 224) + 1
    bic = T.InterpolationMode.BICUBIC

    def build(p_blur: float, p_sol: float):
        ops: list = [T.ToImage()]
        if augment == "recvis":
            ops.append(T.Resize((size, size), interpolation=bic, antialias=True))
        ops += [T.RandomResizedCrop(size, scale=crop_scale, interpolation=bic, antialias=True),
                T.RandomHorizontalFlip(0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=p_blur),
                T.RandomSolarize(threshold=128, p=p_sol),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(mean), list(std))]
        return T.Compose(ops)

    return build(1.0, 0.0), build(0.1, 0.2)


class TwoViews:
    """Dataset wrapper: item -> (view1, view2) of its image (``item["image"]``, ``item.image`` or the item)."""

    def __init__(self, dataset, transforms: tuple[Callable, Callable]):
        self.dataset, (self.t1, self.t2) = dataset, transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.dataset[i]
        img = item["image"] if isinstance(item, dict) else getattr(item, "image", item)
        return self.t1(img), self.t2(img)
