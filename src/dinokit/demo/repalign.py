"""Demo stage ``repalign``: a tiny denoiser trained with L1 vs L1 + 0.1 * RepAlign (short version of the example)."""

from __future__ import annotations

import copy
import time

import torch

from ..methods.repalign_example import format_table, run_restoration, scene_tensors
from ..viz import save_grid
from .foundation import demo_backbone, demo_scenes

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
