"""Demo stage ``repalign``: a tiny denoiser trained with L1 vs L1 + 0.1 * RepAlign (short version of the example).

The toy restoration task lives here too, for this stage and ``examples/repalign_restoration.py`` (the full run):
images are float (B, 3, H, W) in [0, 1]; the noise is additive Gaussian (sigma in the same units); the teacher sees
``(x - mean) / std``. Reported on held-out scenes: PSNR (dB, peak 1, mean over images, after clamping to [0, 1]) and
the teacher-feature cosine (mean over tokens / positions of the cosine between the teacher's final features of the
restored and the clean image). See docs/methods/repalign.md.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.repalign import RepAlignLoss, TeacherInput
from ..viz import save_grid
from .foundation import demo_backbone, demo_scenes


# ------------------------------------------------------------------------------------------ the toy restoration task
class TinyDenoiser(nn.Module):
    """Residual conv denoiser: x + net(x), ``depth`` 3x3 convs of ``width`` channels. (B, 3, H, W) -> same."""

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # starts as the identity

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def scene_tensors(scenes, device: str | torch.device = "cpu") -> Tensor:
    """A ``SyntheticScenes`` (or list of Scene) -> float (N, 3, H, W) in [0, 1]."""
    arr = np.stack([scenes[i].image for i in range(len(scenes))])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def add_noise(clean: Tensor, sigma: float, seed: int) -> Tensor:
    """clean + N(0, sigma^2), seeded (same seed -> same noise)."""
    g = torch.Generator().manual_seed(seed)
    return clean + sigma * torch.randn(clean.shape, generator=g).to(clean.device)


def psnr(pred: Tensor, clean: Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), prediction clamped to [0, 1]."""
    mse = (pred.clamp(0, 1) - clean).square().flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def _final_features(teacher: nn.Module, x: Tensor) -> Tensor:
    """Teacher features (B, positions, D): timm ``forward_features`` tokens, or the output (channels -> D)."""
    f = teacher.forward_features(x) if hasattr(teacher, "forward_features") else teacher(x)
    if f.dim() == 4:  # (B, C, H, W) conv features
        f = f.flatten(2).transpose(1, 2)
    elif f.dim() == 2:
        f = f[:, None]
    return f


@torch.no_grad()
def teacher_cosine(teacher: nn.Module, normalize: Callable[[Tensor], Tensor], pred: Tensor, clean: Tensor,
                   batch: int = 32) -> float:
    """Mean cosine between the teacher's final features of ``pred`` (clamped) and ``clean``."""
    cos = []
    for i in range(0, len(pred), batch):
        a = _final_features(teacher, normalize(pred[i:i + batch].clamp(0, 1)))
        b = _final_features(teacher, normalize(clean[i:i + batch]))
        cos.append(F.cosine_similarity(a.float(), b.float(), dim=-1).flatten())
    return float(torch.cat(cos).mean())


def train_denoiser(clean: Tensor, sigma: float, loss_fn: Callable[[Tensor, Tensor], Tensor], *, steps: int,
                   batch: int = 16, lr: float = 2e-3, seed: int = 0, width: int = 32) -> TinyDenoiser:
    """Adam on fresh noise every step (seeded); ``loss_fn(restored, clean)``."""
    torch.manual_seed(seed)
    model = TinyDenoiser(width).to(clean.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(clean), (min(batch, len(clean)),), generator=g)
        y = clean[idx]
        x = y + sigma * torch.randn(y.shape, generator=g).to(y.device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class RestorationRow:
    """Held-out results of one training loss; ``examples``: the first ``keep`` restored images (or None)."""

    psnr: float
    teacher_cos: float
    seconds: float = 0.0
    examples: Tensor | None = field(default=None, repr=False)


def run_restoration(teacher: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], train_clean: Tensor,
                    test_clean: Tensor, *, sigma: float = 0.1, steps: int = 200, batch: int = 16, lr: float = 2e-3,
                    weight: float = 0.1, seed: int = 0, width: int = 32, repalign_kwargs: dict | None = None,
                    keep: int = 0) -> dict[str, RestorationRow]:
    """Train with L1 and with L1 + ``weight`` * RepAlign (same seed, steps, data); evaluate on noisy ``test_clean``.

    Returns rows ``"noisy input"``, ``"L1"`` and ``"L1+RepAlign"`` (each keeping its first ``keep`` images).
    """
    teacher = teacher.to(train_clean.device).eval()
    norm = TeacherInput(mean, std).to(train_clean.device)
    test_noisy = add_noise(test_clean, sigma, seed + 12345)
    rows = {"noisy input": RestorationRow(psnr(test_noisy, test_clean),
                                          teacher_cosine(teacher, norm, test_noisy, test_clean),
                                          examples=test_noisy[:keep].clamp(0, 1) if keep else None)}
    with RepAlignLoss(teacher, norm, **(repalign_kwargs or {})) as ra:
        losses: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
            "L1": lambda p, t: F.l1_loss(p, t),
            "L1+RepAlign": lambda p, t: F.l1_loss(p, t) + weight * ra(p, t),
        }
        for name, fn in losses.items():
            t0 = time.perf_counter()
            model = train_denoiser(train_clean, sigma, fn, steps=steps, batch=batch, lr=lr, seed=seed,
                                   width=width)
            dt = time.perf_counter() - t0
            with torch.no_grad():
                pred = torch.cat([model(test_noisy[i:i + 32]) for i in range(0, len(test_noisy), 32)])
            rows[name] = RestorationRow(psnr(pred, test_clean), teacher_cosine(teacher, norm, pred, test_clean), dt,
                                        pred[:keep].clamp(0, 1) if keep else None)
    return rows


def format_table(rows: dict[str, RestorationRow]) -> str:
    """Markdown table of the rows."""
    lines = ["| training loss | PSNR (dB) | teacher cosine | train s |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.psnr:.2f} | {r.teacher_cos:.4f} | {r.seconds:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the demo stage
# backbones trained by earlier demo stages (from random init), by preference
TRAINED_KEYS = {"bt_backbone": "the demo ViT after the barlow stage's short Barlow Twins training",
                "neco_backbone": "the demo ViT after the neco stage's short NeCo training"}


def _teacher(ctx):
    """(backbone copy, description, trained?): a backbone trained by an earlier stage if cached, else the random one.

    A copy, because RepAlignLoss freezes its teacher and the cached model belongs to other stages.
    """
    for key, text in TRAINED_KEYS.items():
        bb = ctx.cache.get(key)
        if bb is not None and hasattr(bb, "model") and ctx.image_size % bb.patch_size == 0:
            return copy.deepcopy(bb), f"{text} (ctx.cache[{key!r}]; a few dozen steps, still weak)", True
    for key, value in ctx.cache.items():
        info = getattr(value, "weights_info", None)
        if hasattr(value, "model") and isinstance(info, dict) and info.get("source") not in (None, "random") \
                and getattr(value, "patch_size", 0) and ctx.image_size % value.patch_size == 0:
            return copy.deepcopy(value), f"the backbone cached as {key!r} ({info.get('source')} weights)", True
    bb = ctx.cache.get("backbone")
    bb = demo_backbone(ctx) if bb is None else copy.deepcopy(bb)
    return bb, f"{bb.name} with RANDOM initialisation (no trained teacher in the cache)", False


def run(ctx) -> dict[str, float | int | str]:
    t0 = time.perf_counter()
    bb, teacher_text, trained = _teacher(ctx)
    steps = 8 if ctx.quick else 40
    n_test = 8 if ctx.quick else 16
    train = scene_tensors(demo_scenes(ctx, "train"), ctx.device)
    test = scene_tensors(demo_scenes(ctx, "test"), ctx.device)[:n_test]
    if ctx.quick:
        train = train[:16]
    threads = torch.get_num_threads()
    # tiny tensors: the per-op thread synchronisation costs more than a second thread gains (10x on a busy host)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            rows = run_restoration(bb.model, bb.mean, bb.std, train, test, sigma=0.1, steps=steps, batch=8,
                                   lr=3e-3, weight=0.1, seed=ctx.seed, width=16, keep=3)
    finally:
        torch.set_num_threads(threads)
    table = format_table(rows)
    ctx.log(table)
    text = (f"Denoising (Gaussian noise, sigma 0.1 on [0, 1] images) with a tiny residual CNN, trained {steps} steps "
            f"(batch 8) on {len(train)} synthetic scenes with L1 alone and with L1 + 0.1 RepAlign (group mode, "
            f"g = 2, every Conv2d/Linear of the teacher). Teacher: {teacher_text}. "
            + ("" if trained else "With random weights the RepAlign term aligns the activations of an untrained "
               "network, so its effect here says nothing about a pretrained DINO teacher. ")
            + f"PSNR and teacher-feature cosine on {len(test)} held-out noisy scenes. "
            f"Short run: the numbers are noisy; see examples/repalign_restoration.py for a longer one.")
    def rgb(t):
        return t.permute(1, 2, 0).cpu().numpy()

    panels = [[rgb(test[i])] + [rgb(r.examples[i]) for r in rows.values()] for i in range(min(3, len(test)))]
    titles = [["clean"] + [f"{name} {psnr_db:.1f} dB" for name, psnr_db in
                           ((n, float(-10 * ((r.examples[i] - test[i]) ** 2).mean().log10())) for n, r in rows.items())]
              for i in range(len(panels))]
    fig = save_grid(ctx.figures / "repalign_denoising.png", panels, titles)
    ctx.section("RepAlign perceptual loss (denoising)", text, [fig],
                table={f"{name} {k}": round(v, 4) for name, r in rows.items()
                       for k, v in (("PSNR dB", r.psnr), ("teacher cos", r.teacher_cos))})
    out: dict[str, float | int | str] = {"teacher": bb.name, "steps": steps,
                                         "weights": "trained" if trained else "random"}
    for name, r in rows.items():
        key = name.replace(" ", "_").replace("+", "_")
        out[f"{key}/psnr"] = round(r.psnr, 3)
        out[f"{key}/teacher_cos"] = round(r.teacher_cos, 4)
    ctx.log(f"repalign stage: {time.perf_counter() - t0:.1f} s")
    return out
