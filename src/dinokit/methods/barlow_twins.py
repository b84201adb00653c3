"""Barlow Twins for ViTs (and ResNets): loss, projector, two-view augmentations, global-batch DDP, training.

Pure-torch core first (``BarlowTwinsLoss``, ``Projector``, ``BarlowTwins``, ``gather_batch``,
``GatheredBatchNorm``, ``LARS``, ``warmup_cosine``); the Lightning module ``BarlowTwinsModule`` at the end
imports Lightning lazily. Spec: ``shared/spec/barlow_vit.md`` §1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
class LARS(torch.optim.Optimizer):
    """LARS of the official Barlow Twins recipe: g' = g + wd p, q = eta |p| / |g'| (1 if a norm is 0),
    mu <- momentum mu + q g', p <- p - lr mu. Groups with ``lars_exclude=True`` skip decay and adaptation."""

    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not g["lars_exclude"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(un > 0, g["eta"] * pn / un, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.001) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then base*(q + final*(1 - q)) with
    q = (1 + cos(pi (t - T_w) / (T - T_w))) / 2; never restarts (clamped at the end)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    t = min(max(step - warmup, 0), span)
    q = 0.5 * (1.0 + math.cos(math.pi * t / span))
    return q + final * (1.0 - q)


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None,
                 bias_lr: float | None = None) -> list[dict]:
    """Two groups: weights (decayed) and ndim <= 1 parameters (no decay, excluded from LARS adaptation)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    g1: dict = {"params": decay, "weight_decay": weight_decay}
    g2: dict = {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}
    if lr is not None:
        g1["lr"] = lr
    if bias_lr is not None:
        g2["lr"] = bias_lr
    return [g for g in (g1, g2) if g["params"]]


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


# ---------------------------------------------------------------------------------------------- Lightning
def _make_lightning_module():
    import lightning.pytorch as pl

    class BarlowTwinsModule(pl.LightningModule):
        """Lightning wrapper: batches are (view1, view2); AdamW (or LARS), warm-up + cosine stepped per optimiser
        step, the loss logged as ``train/loss`` / ``val/loss``. ``weights`` goes to ``load_backbone`` (a dino_*
        name with ``"pretrained"`` starts from DINO weights; ``"random"``; or a file).

        Args mirror :func:`dinokit.methods.barlow_twins_commands.fit`.
        """

        def __init__(self, backbone: str = "demo_vit", weights: str = "random", projector: str = "small",
                     pool: str = "cls", lambd: float = 0.0051, norm: str = "batchnorm", eps: float = 1e-5,
                     optimizer: str = "adamw", lr: float = 3e-4, lr_scaling: str = "none", weight_decay: float = 1e-5,
                     betas: tuple[float, float] = (0.9, 0.999), warmup_epochs: float = 10, batch_size: int = 256,
                     model_kwargs: dict | None = None):
            super().__init__()
            if optimizer not in ("adamw", "lars"):
                raise ValueError(f"optimizer={optimizer!r}; choose 'adamw' or 'lars'")
            if lr_scaling not in ("none", "linear"):
                raise ValueError(f"lr_scaling={lr_scaling!r}; choose 'none' or 'linear'")
            self.save_hyperparameters()
            from ..backbones import load_backbone

            bb = load_backbone(backbone, weights=weights, model_kwargs=model_kwargs)
            self.model = BarlowTwins(bb, projector, pool, lambd, norm, eps)

        @property
        def backbone(self):
            """The dinokit Backbone being trained (``model.backbone``; stored once in the checkpoint)."""
            return self.model.backbone

        @property
        def criterion(self) -> BarlowTwinsLoss:
            return self.model.criterion

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            # early dinokit checkpoints stored the backbone twice (backbone.* and model.backbone.*)
            sd = checkpoint.get("state_dict", {})
            if any(k.startswith("model.backbone.") for k in sd):
                for k in [k for k in sd if k.startswith("backbone.")]:
                    del sd[k]

        def setup(self, stage: str) -> None:
            # before the optimisers and the DDP wrapper exist: make every BatchNorm global-batch on non-CUDA DDP
            # (CUDA DDP: Trainer(sync_batchnorm=True) converts to nn.SyncBatchNorm)
            trainer = self.trainer
            if trainer.world_size > 1 and trainer.strategy.root_device.type != "cuda":
                self.model.projector = convert_batchnorm(self.model.projector, "cpu")
                self.model.backbone = convert_batchnorm(self.model.backbone, "cpu")

        def _step(self, batch, stage: str) -> torch.Tensor:
            x1, x2 = batch[0], batch[1]
            loss = self.model(x1, x2)
            n = x1.shape[0]
            self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
            self.log(f"{stage}/on_diag", self.criterion.last_terms["on_diag"], batch_size=n)
            self.log(f"{stage}/off_diag", self.criterion.last_terms["off_diag"], batch_size=n)
            self.log(f"{stage}/rank_bound", self.criterion.rank_bound, batch_size=n)
            return loss

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
            return self._step(batch, "val")

        def configure_optimizers(self):
            hp = self.hparams
            B = hp.batch_size * max(1, self.trainer.world_size if self._trainer is not None else 1)
            if hp.optimizer == "lars":
                opt = LARS(param_groups(self.model, hp.weight_decay, lr=0.2 * B / 256, bias_lr=0.0048 * B / 256),
                           lr=0.2 * B / 256, weight_decay=hp.weight_decay)
            else:
                lr = hp.lr * (B / 256 if hp.lr_scaling == "linear" else 1.0)
                opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=lr, betas=tuple(hp.betas))
            total = int(self.trainer.estimated_stepping_batches)
            per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
            warm = int(round(hp.warmup_epochs * per_epoch))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    BarlowTwinsModule.__module__ = __name__
    BarlowTwinsModule.__qualname__ = "BarlowTwinsModule"
    return BarlowTwinsModule


_LAZY: dict[str, object] = {}


def __getattr__(name: str):
    """``BarlowTwinsModule`` is built on first access, so importing the core never imports Lightning."""
    if name == "BarlowTwinsModule":
        if name not in _LAZY:
            _LAZY[name] = _make_lightning_module()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
