"""Segmentation heads on ViT patch tokens (any patch size, non-square grids), losses, protocols and training.

Heads (``build_head``): ``linear`` (1x1 conv), ``linear_patch`` (per-token Linear to p^2 K), ``setr_naive``,
``setr_pup`` (SETR progressive upsampling: 3x3 conv + BN + ReLU stages), ``setr_pup_linear`` (the purely linear
RecvisProject variant), ``aspp`` (DeepLabV3 head from torchvision's ``ASPP``). Every head takes DenseFeatures,
(B, h, w, D) tokens, or (B, N, D) tokens plus the grid, and returns logits (B, K, h p, w p) (or ``out_size``).

Losses: ``ce`` (ignore 255), ``dice`` (present classes), ``ce+dice``. Evaluation: the VOC protocol ``orig``
(ignore 255, logits upsampled to the original resolution) and ``recvis224`` (void -> background, 224^2), both
streamed into :class:`dinokit.eval.metrics.ConfusionMatrix`. Pure torch; the Lightning module ``SegmentationModule``
is in :mod:`dinokit.methods.seg_heads.lightning`. See docs/methods/barlow_twins.md (segmentation heads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "linear_patch", "setr_naive", "setr_pup", "setr_pup_linear", "aspp")
LOSSES = ("ce", "dice", "ce+dice")
PROTOCOLS = ("orig", "recvis224")


# ------------------------------------------------------------------------------------------ heads
class SegHead(nn.Module):
    """Base: input checks and the (B, D, h, w) permute. Subclasses implement ``decode(x) -> (B, K, ?, ?)``."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int):
        super().__init__()
        if in_dim <= 0 or num_classes <= 0 or patch_size <= 0:
            raise ValueError(f"in_dim, num_classes and patch_size must be positive, got {in_dim}, {num_classes}, "
                             f"{patch_size}")
        self.in_dim, self.num_classes, self.patch_size = in_dim, num_classes, patch_size

    def _grid_input(self, feats, grid: tuple[int, int] | None,
                    image_size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
        if hasattr(feats, "patch") and hasattr(feats, "patch_size"):  # DenseFeatures
            if feats.patch_size != self.patch_size:
                raise ValueError(f"{type(self).__name__} was built for patch size {self.patch_size} but the backbone "
                                 f"has patch size {feats.patch_size}; build the head with patch_size="
                                 f"{feats.patch_size}")
            image_size = image_size or feats.image_size
            t = feats.patch
        else:
            t = feats
        if t.ndim == 3:
            if grid is None:
                raise ValueError("tokens (B, N, D) need grid=(h, w)")
            if t.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"{t.shape[1]} tokens do not fill the grid {grid} (h*w = {grid[0] * grid[1]}); "
                                 "drop the CLS/register tokens first")
            t = t.reshape(t.shape[0], grid[0], grid[1], t.shape[2])
        if t.ndim != 4:
            raise ValueError(f"expected patch tokens (B, h, w, D) or (B, N, D), got shape {tuple(t.shape)}")
        if t.shape[-1] != self.in_dim:
            raise ValueError(f"tokens have width {t.shape[-1]} but the head expects in_dim={self.in_dim}")
        h, w = t.shape[1], t.shape[2]
        if grid is not None and tuple(grid) != (h, w):
            raise ValueError(f"grid {tuple(grid)} does not match the tokens' grid {(h, w)}")
        p = self.patch_size
        if image_size is not None and tuple(image_size) != (h * p, w * p):
            raise ValueError(f"image size {tuple(image_size)} does not match the token grid {(h, w)} x patch size "
                             f"{p} = {(h * p, w * p)}; the head's patch size must equal the backbone's")
        return t.permute(0, 3, 1, 2).contiguous(), (h, w)

    def forward(self, feats, grid: tuple[int, int] | None = None, image_size: tuple[int, int] | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        x, (h, w) = self._grid_input(feats, grid, image_size)
        y = self.decode(x)
        size = tuple(out_size) if out_size is not None else (h * self.patch_size, w * self.patch_size)
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LinearHead(SegHead):
    """Conv1x1(D -> K), then bilinear x p (align_corners=False)."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int):
        super().__init__(in_dim, num_classes, patch_size)
        self.conv = nn.Conv2d(in_dim, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearPatchHead(SegHead):
    """Linear(D, p^2 K) per token, read as (p1, p2, K) and written to pixel (i p + p1, j p + p2)."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int):
        super().__init__(in_dim, num_classes, patch_size)
        self.fc = nn.Linear(in_dim, patch_size * patch_size * num_classes)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        p, K = self.patch_size, self.num_classes
        y = self.fc(x.permute(0, 2, 3, 1)).view(B, h, w, p, p, K)
        return y.permute(0, 5, 1, 3, 2, 4).reshape(B, K, h * p, w * p)


class SETRNaiveHead(SegHead):
    """Conv1x1(D -> c) + BN + ReLU + Conv1x1(c -> K) (biases on), then bilinear to the output size; c = D default."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, channels: int | None = None):
        super().__init__(in_dim, num_classes, patch_size)
        c = channels or in_dim
        self.net = nn.Sequential(nn.Conv2d(in_dim, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                 nn.Conv2d(c, num_classes, 1))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _n_up(p: int) -> int:
    return max(1, math.ceil(math.log2(p)))


class _Up2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class SETRPUPHead(SegHead):
    """SETR-PUP: [optional LayerNorm], ceil(log2 p) x [Conv3x3(-> c, bias=False) + BN + ReLU + bilinear x2],
    Conv1x1(c -> K), then a bilinear resize to (h p, w p) when 2^n_up != p (e.g. p = 14)."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, channels: int = 256,
                 input_norm: bool = False):
        super().__init__(in_dim, num_classes, patch_size)
        self.norm = nn.LayerNorm(in_dim) if input_norm else None
        layers: list[nn.Module] = []
        c_in = in_dim
        for _ in range(_n_up(patch_size)):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True), _Up2()]
            c_in = channels
        self.stages = nn.Sequential(*layers)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.cls(self.stages(x))


class SETRPUPLinearHead(SegHead):
    """RecvisProject's linear "PUP": Conv1x1(D -> D/4), x2, (n_up - 1) x [Conv1x1(D/4 -> D/4), x2],
    Conv1x1(D/4 -> K); no BN, no ReLU (a purely linear map)."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int):
        super().__init__(in_dim, num_classes, patch_size)
        c = max(1, in_dim // 4)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, c, 1), _Up2()]
        for _ in range(_n_up(patch_size) - 1):
            layers += [nn.Conv2d(c, c, 1), _Up2()]
        layers.append(nn.Conv2d(c, num_classes, 1))
        self.net = nn.Sequential(*layers)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ASPPHead(SegHead):
    """DeepLabV3 head on the token grid: torchvision ``ASPP(D -> 256, rates)`` (1x1, three atrous 3x3, image
    pooling; concat -> 1x1 + BN + ReLU + Dropout 0.5), then 3x3 conv + BN + ReLU, 1x1 conv K, bilinear x p.
    ``rates=(6, 12, 18)`` (output stride 16); torchvision's default is (12, 24, 36)."""

    def __init__(self, in_dim: int, num_classes: int, patch_size: int, rates: Sequence[int] = (6, 12, 18),
                 channels: int = 256):
        super().__init__(in_dim, num_classes, patch_size)
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.rates = tuple(int(r) for r in rates)
        self.aspp = ASPP(in_dim, self.rates, channels)
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, num_classes, 1))
        self._warned: set[tuple[int, int]] = set()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.training and x.shape[0] < 2:
            raise ValueError("the ASPP head needs a batch of at least 2 in training (its image-pooling BatchNorm "
                             "sees one value per channel); increase batch_size or use another head")
        big = [r for r in self.rates if r >= min(h, w)]
        if big and (h, w) not in self._warned:
            self._warned.add((h, w))
            warnings.warn(f"ASPP rates {big} >= the {h}x{w} token grid: those branches degenerate towards a 1x1 "
                          "conv; use smaller rates for small grids", stacklevel=2)
        return self.head(self.aspp(x))


def build_head(name: str, in_dim: int, num_classes: int, patch_size: int, **kwargs) -> SegHead:
    """A head by name (see ``HEADS``); ``kwargs`` go to its constructor (``channels``, ``rates``, ...)."""
    classes = {"linear": LinearHead, "linear_patch": LinearPatchHead, "setr_naive": SETRNaiveHead,
               "setr_pup": SETRPUPHead, "setr_pup_linear": SETRPUPLinearHead, "aspp": ASPPHead}
    if name not in classes:
        raise ValueError(f"unknown head {name!r}; choose one of {HEADS}")
    return classes[name](in_dim, num_classes, patch_size, **kwargs)


# ------------------------------------------------------------------------------------------ losses
def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1e-7) -> torch.Tensor:
    """Mean over classes present in ``target`` of 1 - 2 sum p_c y_c / max(sum p_c + sum y_c, eps), over batch and
    pixels, with ignored pixels masked out. logits (B, K, H, W), target (B, H, W)."""
    K = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)
    prob = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).long(), K).permute(0, 3, 1, 2) * valid
    inter = (prob * onehot).sum((0, 2, 3))
    den = (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))).clamp_min(eps)
    dice = 2 * inter / den
    present = onehot.sum((0, 2, 3)) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return (1.0 - dice[present]).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "ce",
                      ignore_index: int = 255) -> torch.Tensor:
    """``ce`` (mean over non-ignored pixels), ``dice`` or ``ce+dice`` (1:1)."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {LOSSES}")
    if logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape[-2:])} and target {tuple(target.shape[-2:])} differ in size")
    out = logits.new_zeros(())
    if "ce" in loss.split("+"):
        if bool((target != ignore_index).any()):
            out = out + F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)
        else:
            out = out + logits.sum() * 0.0
    if "dice" in loss.split("+"):
        out = out + dice_loss(logits, target, ignore_index)
    return out


# ------------------------------------------------------------------------------------------ protocols
def eval_size(H: int, W: int, short_side: int, p: int) -> tuple[int, int]:
    """Aspect-kept size whose shorter side is ``short_side``, both sides rounded to multiples of ``p``."""
    s = short_side / min(H, W)
    return max(p, round(H * s / p) * p), max(p, round(W * s / p) * p)


def protocol_target(mask: torch.Tensor, protocol: str = "orig", size: int = 224) -> torch.Tensor:
    """The ground truth a protocol scores against: ``orig`` the mask itself (255 ignored); ``recvis224`` void -> 0
    and nearest-resized to size x size."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "orig":
        return mask
    m = torch.where(mask == 255, torch.zeros_like(mask), mask)
    return F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def update_confusion(cm, logits: torch.Tensor, mask: torch.Tensor, protocol: str = "orig", size: int = 224) -> None:
    """Stream one image: logits (1 or K, h', w') upsampled bilinearly to the protocol's target size, argmax."""
    if logits.ndim == 4:
        logits = logits[0]
    target = protocol_target(torch.as_tensor(mask), protocol, size)
    up = F.interpolate(logits[None].float(), size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    cm.update(target, up[0].argmax(0).cpu())


def new_confusion(num_classes: int, protocol: str = "orig"):
    """The dense-eval ``ConfusionMatrix``: ignore 255 for ``orig``, no ignore for ``recvis224``."""
    from ...eval.metrics import ConfusionMatrix

    return ConfusionMatrix(num_classes, num_classes, ignore_index=255 if protocol == "orig" else None)


def protocol_miou(cm, protocol: str = "orig") -> float:
    """mIoU of a streamed matrix: ``orig`` excludes absent classes (``absent="nan"``); ``recvis224`` too."""
    return float(cm.compute(matching="none", absent="nan")["miou"])


# ------------------------------------------------------------------------------------------ data
class SegTrainTransform:
    """Random crop whose sides are c ~ U(lo, hi) of the image's (same c for H and W, random position), resize to
    ``size`` (bilinear image, nearest mask), hflip 0.5 (optional vflip), normalise. Item -> (image (3, S, S) float,
    mask (S, S) int64)."""

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.6, 0.8), hflip: float = 0.5,
                 vflip: float = 0.0, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.size, self.scale, self.hflip, self.vflip, self.mean, self.std = size, scale, hflip, vflip, mean, std

    def __call__(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision.transforms.v2.functional as TF
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.from_numpy(np.asarray(item["image"], np.uint8).copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.asarray(item["mask"], np.int64).copy()))
        H, W = img.shape[-2:]
        c = float(torch.empty(()).uniform_(*self.scale))
        ch, cw = max(1, round(c * H)), max(1, round(c * W))
        top = int(torch.randint(0, H - ch + 1, ()))
        left = int(torch.randint(0, W - cw + 1, ()))
        img, mask = TF.crop(img, top, left, ch, cw), TF.crop(mask, top, left, ch, cw)
        img = TF.resize(img, [self.size, self.size], antialias=True)
        mask = TF.resize(mask, [self.size, self.size])  # Mask -> nearest
        if torch.rand(()) < self.hflip:
            img, mask = TF.horizontal_flip(img), TF.horizontal_flip(mask)
        if torch.rand(()) < self.vflip:
            img, mask = TF.vertical_flip(img), TF.vertical_flip(mask)
        x = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(self.mean), list(self.std))
        return x.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class SegEvalTransform:
    """``orig``: aspect-kept resize to shorter side ``short_side`` (sides multiples of p), the mask untouched;
    ``recvis224``: image resized to size x size. Item -> (image (3, h, w) float, original mask (H, W) int64)."""

    def __init__(self, patch_size: int, protocol: str = "orig", short_side: int = 320, size: int = 224,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
        if protocol == "recvis224" and size % patch_size:
            raise ValueError(f"recvis224 size {size} is not a multiple of the patch size {patch_size}")
        self.p, self.protocol, self.short_side, self.size, self.mean, self.std = (patch_size, protocol, short_side,
                                                                                   size, mean, std)

    def __call__(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision.transforms.v2.functional as TF

        img = torch.from_numpy(np.asarray(item["image"], np.uint8).copy()).permute(2, 0, 1)
        H, W = img.shape[-2:]
        hw = eval_size(H, W, self.short_side, self.p) if self.protocol == "orig" else (self.size, self.size)
        img = TF.resize(img, list(hw), antialias=True)
        x = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(self.mean), list(self.std))
        return x, torch.from_numpy(np.asarray(item["mask"], np.int64).copy())


class Mapped(torch.utils.data.Dataset):
    """``dataset[i]`` through ``fn``."""

    def __init__(self, dataset, fn):
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.fn(self.dataset[i])


def collate_eval(items: list) -> dict:
    """Eval batches keep per-image sizes: ``image``/``mask`` are stacked when all shapes agree, else lists."""
    imgs, masks = [it[0] for it in items], [it[1] for it in items]
    same = len({tuple(i.shape) for i in imgs}) == 1 and len({tuple(m.shape) for m in masks}) == 1
    return {"image": torch.stack(imgs) if same else imgs, "mask": torch.stack(masks) if same else masks}


def collate_train(items: list) -> dict:
    return {"image": torch.stack([it[0] for it in items]), "mask": torch.stack([it[1] for it in items])}
