"""The classification recipe of attention-guided crops: ResNet via timm, SGD with two weight-decay groups, step/cosine
schedules, label smoothing, an EMA updated every 32 batches, colour-only augmentation and the crop modes ``rrc`` |
``localized`` | ``density``. See docs/methods/localisation.md.

Pure torch (model, parameter groups, schedules, EMA, transforms, datasets, the recipe's numbers); the Lightning
module ``ClassifierModule`` and ``fit_classifier`` are in :mod:`dinokit.methods.classifier.lightning`. Data sources:
the in-memory synthetic fine-grained scenes (``SceneSource``, main-object box = ``boxes[0]``) and the CUB-200-2011
layout (``CUBSource`` over ``dinokit.data.datasets.CUB200``; pseudo-box ids are CUB's 1-based ``images.txt`` ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ...data import crops as C
from ..training import cosine_schedule
from ..training import param_groups as _param_groups

CROP_MODES = ("rrc", "localized", "density")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ------------------------------------------------------------------------------------------ model and optimisation


def build_classifier(arch: str = "resnet50", num_classes: int = 200, weights: str = "random",
                     model_kwargs: dict | None = None) -> nn.Module:
    """A timm ResNet with a new head (Kaiming-normal fan_out, zero bias).

    ``weights``: ``"random"``; ``"pretrained"`` (timm's default tag, ``resnet50.tv2_in1k`` for resnet50, which equals
    torchvision's IMAGENET1K_V2; needs the Hub or its cache); or a local state-dict file (``.safetensors``/``.pt``) of
    this model with its head (stage 2 starting from stage 1's EMA weights), loaded as is.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    path = Path(weights) if weights not in ("random", "pretrained") else None
    if weights == "pretrained":
        name = "resnet50.tv2_in1k" if arch == "resnet50" else arch
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as err:  # noqa: BLE001 - offline or unknown tag: say what to do
            raise RuntimeError(f"could not load pretrained weights for {name!r} ({err}); pass weights='random' or a "
                               "local state-dict file") from err
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"classifier weights {path} not found; use 'random', 'pretrained' or a file "
                                    "written by `dinokit classify fit` (ema.safetensors)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd)
        return model
    head = model.get_classifier()
    nn.init.kaiming_normal_(head.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(head.bias)
    return model


def param_groups(model: nn.Module, weight_decay: float = 1e-4) -> list[dict]:
    """Two SGD groups: ``weight_decay`` for parameters with ndim > 1, 0 for ndim <= 1 (BN weights, all biases).
    The recipe's setting of :func:`dinokit.methods.training.param_groups`."""
    return _param_groups(model, weight_decay)


def step_lr(epoch: int, lr: float = 2e-4, epochs: int = 200, lr_end: float = 1e-5, every: int = 10) -> float:
    """The step schedule: lr * gamma^floor(epoch / every), gamma = (lr_end / lr)^(every / epochs) (no warm-up)."""
    gamma = (lr_end / lr) ** (every / epochs)
    return lr * gamma ** (epoch // every)


def cosine_lr(step: int, total_steps: int, lr: float = 2e-4, lr_end: float = 1e-5, warmup_steps: int = 0,
              start_factor: float = 0.01) -> float:
    """Per-step cosine from lr to lr_end after an optional linear warm-up from start_factor * lr.
    The recipe's setting of :func:`dinokit.methods.training.cosine_schedule`."""
    return cosine_schedule(step, total_steps, lr, lr_end, warmup_steps, start_factor)


class EmaEvery(nn.Module):
    """EMA of every state-dict tensor (BN buffers included; timm ``ModelEmaV3``), updated after the optimiser step when
    the within-epoch batch index ``i % every == 0``; the first update copies the weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999, every: int = 32):
        super().__init__()
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay)
        self.ema.requires_grad_(False)
        self.every = every
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def maybe_update(self, model: nn.Module, batch_idx: int) -> bool:
        if batch_idx % self.every:
            return False
        self.updates += 1
        self.ema.update(model, step=self.updates)  # step 1 -> decay 0 (a copy), then ``decay``
        return True


def set_bn_eval(model: nn.Module) -> None:
    """Freeze BN statistics (the reference's behaviour from epoch 2 on; ``bn_freeze_after_epoch``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def bn_in_train_mode(model: nn.Module) -> bool:
    return all(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


# ------------------------------------------------------------------------------------------ transforms


def colour_augment(p: float = 1.0):
    """The colour-only RandomChoice: ColorJitter(0.5p, 0.5p, 0.5p, 0.1p) | Posterize(4/3/2 bits) | Solarize(192/230) |
    Equalize | AutoContrast, each of the last four with probability p. Works on uint8 tensors and PIL images."""
    from torchvision.transforms import v2

    return v2.RandomChoice([
        v2.ColorJitter(brightness=0.5 * p, contrast=0.5 * p, saturation=0.5 * p, hue=0.1 * p),
        v2.RandomChoice([v2.RandomPosterize(b, p=p) for b in (4, 3, 2)]),
        v2.RandomChoice([v2.RandomSolarize(t, p=p) for t in (192, 230)]),
        v2.RandomEqualize(p=p),
        v2.RandomAutocontrast(p=p),
    ])


def _normalise(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.normalize(x.float().div(255.0), list(mean), list(std))


def val_transform(size: int = 224):
    """Resize(size) on the shorter side, CenterCrop(size), ImageNet normalisation; uint8 (3, H, W) in."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


# ------------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    image: np.ndarray | object  # (H, W, 3) uint8 or PIL
    label: int
    image_id: str
    box: list[float] | None


class SceneSource:
    """In-memory synthetic fine-grained scenes: label = the mark class, box = ``boxes[0]`` (the main object)."""

    def __init__(self, scenes, ids: Sequence[str] | None = None):
        self.samples = []
        for i in range(len(scenes)):
            s = scenes[i]
            box = s.boxes[0].tolist() if len(s.boxes) else None
            self.samples.append(Sample(s.image, int(s.label), str(ids[i]) if ids else s.image_id, box))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def ids(self) -> list[str]:
        return [s.image_id for s in self.samples]


class CUBSource:
    """CUB-200-2011 through ``dinokit.data.datasets.CUB200``; ids are the numeric ``images.txt`` ids (as strings)."""

    def __init__(self, root: str | Path, split: str = "train", split_mode: str = "dinov2_consistent"):
        from ...data.datasets import CUB200

        self.ds = CUB200(root, split=split, split_mode=split_mode)
        self.num_classes = self.ds.num_classes
        self._ids = [str(i) for i in self.ds.cub_ids]
        self._boxes = [None if r.boxes is None else r.boxes[0].tolist() for r in self.ds.records]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample:
        item = self.ds[i]
        return Sample(item["image"], int(item["label"]), self._ids[i], self._boxes[i])

    @property
    def ids(self) -> list[str]:
        return self._ids

    def box(self, i: int) -> list[float] | None:
        return self._boxes[i]


class CropDataset(Dataset):
    """Training or validation views of a source. Train: colour augmentation, then the crop mode, flip, normalise.

    ``mode="localized"`` uses ``boxes`` (``"gt"`` or a {id: [x, y, w, h]} dict read from a pseudo-box JSON); a
    sample without a box raises unless ``missing_box="rrc"`` (RandomResizedCrop instead, counted in
    ``missing_ids``). ``mode="density"`` with ``density_source="cache"`` crops from a :class:`DensityCache` on the CPU;
    with ``"online"`` it returns ``(canvas uint8 (3, C, C), valid (2,), label)`` and the crops are made batched on
    the training device (``ClassifierModule.on_after_batch_transfer``). No model ever runs here.
    """

    def __init__(self, source, train: bool = True, mode: str = "rrc", size: int = 224, thr: float = 1.0,
                 boxes: str | dict = "gt", missing_box: str = "error", colour_aug: bool = True,
                 density_source: str = "online", density_cache: C.DensityCache | None = None, canvas: int = 512,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        from torchvision.transforms import v2

        if mode not in CROP_MODES:
            raise ValueError(f"crop mode {mode!r}; choose one of {CROP_MODES}")
        if missing_box not in ("error", "rrc"):
            raise ValueError(f"missing_box={missing_box!r}; choose 'error' or 'rrc'")
        if density_source not in ("online", "cache"):
            raise ValueError(f"density_source={density_source!r}; choose 'online' or 'cache'")
        if train and mode == "density" and density_source == "cache" and density_cache is None:
            raise ValueError("density_source='cache' needs a DensityCache (build it with "
                             "`dinokit crops density-cache`)")
        self.source, self.train, self.mode, self.size = source, train, mode, size
        self.density_source, self.cache, self.canvas = density_source, density_cache, canvas
        self.colour = colour_augment(1.0) if colour_aug else None
        self.rrc = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)
        self.loc = C.LocalizedRandomResizedCrop(size, thr=thr, scale=scale, ratio=ratio)
        self.val = val_transform(size)
        self.box_of: list[list[float] | None] = []
        if train and mode == "localized":
            ids = source.ids
            if boxes == "gt":
                self.box_of = [source[i].box if not hasattr(source, "box") else source.box(i) for i in range(len(ids))]
            else:
                self.box_of = [boxes.get(str(k)) for k in ids]
            self.missing_ids = [k for k, b in zip(ids, self.box_of) if b is None]
            if self.missing_ids and missing_box == "error":
                where = "the ground truth" if boxes == "gt" else "the box file"
                raise ValueError(f"{len(self.missing_ids)} training image(s) have no box in {where} "
                                 f"(first: {self.missing_ids[:5]}); pass missing_box='rrc' to use RandomResizedCrop "
                                 "for them, or regenerate the boxes")
        else:
            self.missing_ids = []

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        s = self.source[i]
        if not self.train:
            return _normalise(self.val(C.as_uint8_chw(s.image))), s.label
        # PIL through the augmentations: its colour ops are ~15x faster than the tensor kernels on the CPU
        img = s.image if isinstance(s.image, Image.Image) else Image.fromarray(np.asarray(s.image))
        if self.colour is not None:
            img = self.colour(img)
        if self.mode == "density":
            if self.density_source == "online":
                canvas, valid = C.canvas_image(img, self.canvas)
                return canvas, torch.tensor(valid), s.label
            crop, _, _ = self.cache.crop(img, s.image_id)  # flip included
            return _normalise(crop), s.label
        if self.mode == "localized" and self.box_of[i] is not None:
            img, _ = self.loc(img, self.box_of[i], image_id=s.image_id)
        else:
            img = self.rrc(img)
        x = TF.pil_to_tensor(img)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return _normalise(x), s.label


# ------------------------------------------------------------------------------------------ the recipe


@dataclass
class RecipeConfig:
    """The recipe's numbers (defaults = the reference's stage 2; see docs/methods/localisation.md)."""

    lr: float = 2e-4
    lr_end: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 200
    schedule: str = "step"
    warmup_epochs: int = 0
    label_smoothing: float = 0.1
    ema_decay: float = 0.999
    ema_every: int = 32
    bn_freeze_after_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}; choose 'step' or 'cosine'")
