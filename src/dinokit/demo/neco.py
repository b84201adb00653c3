"""Demo stage: a short NeCo post-training of the random-init ``demo_vit`` on the synthetic scenes.

Overclustering (K = 2x and 5x the number of segmentation classes) and Hummingbird mIoU of the student's final-norm
patch tokens before and after, on the validation scenes. A plain-torch loop over the library's pieces (views, NeCo
core, AdamW groups, cosine schedules, EMA) stands in for the Lightning trainer to keep the stage within seconds.
"""

from __future__ import annotations

import random
import time

import torch
from torch.utils.data import DataLoader

from ..data.synthetic import num_seg_classes
from ..eval.hummingbird import hummingbird
from ..eval.overcluster import overcluster
from ..methods.neco import NeCo, NeCoConfig, NeCoDataset, NeCoViews, neco_collate, param_groups
from ..methods.training import cosine_schedule
from .evaluation import extract
from .foundation import demo_backbone, demo_scenes


def _scores(bb, train, val, c: int, ks: list[int], seeds: tuple[int, ...], device: str) -> dict[str, float]:
    bb.eval()
    tf, tm, _ = extract(bb, train, device)
    vf, vm, _ = extract(bb, val, device)
    oc = overcluster(vf, vm, c, ks=ks, seeds=seeds, niter=30, nredo=1, eval_size=vm.shape[-1])
    hb = hummingbird(tf, tm, vf, vm, c, k=30, memory_size=None, seed=seeds[0])
    out = {f"overcluster/k{k}/miou": oc.metrics[f"k{k}/miou"] for k in ks}
    out.update({f"overcluster/k{k}/bg_frac": oc.metrics[f"k{k}/bg_frac"] for k in ks if f"k{k}/bg_frac" in oc.metrics})
    out["hummingbird/miou"] = hb.metrics["miou"]
    return out


def run(ctx) -> dict[str, float | int | str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP synchronisation costs more than a second thread gains
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx) -> dict[str, float | int | str]:
    t0 = time.perf_counter()
    random.seed(ctx.seed)  # the views' blur radius is drawn from Python's random (reference transform)
    c = num_seg_classes()
    ks = [2 * c, 5 * c]
    seeds = (ctx.seed,) if ctx.quick else (ctx.seed, ctx.seed + 1)
    train, val = demo_scenes(ctx, "train"), demo_scenes(ctx, "val")
    student = demo_backbone(ctx)
    teacher = demo_backbone(ctx)
    before = _scores(student, train, val, c, ks, seeds, ctx.device)
    S = ctx.image_size
    cfg = NeCoConfig(head_hidden=256, head_dim=64, roi_size=4, queue_length=512)
    neco = NeCo(student, teacher, cfg, seed=ctx.seed).to(ctx.device)
    views = NeCoViews(crops=(2, 4), sizes=(S, S // 2), mean=tuple(student.mean), std=tuple(student.std))
    batch_size, epochs = 16, (1 if ctx.quick else 8)
    g = torch.Generator().manual_seed(ctx.seed)
    loader = DataLoader(NeCoDataset(train, views), batch_size=batch_size, shuffle=True, drop_last=True,
                        collate_fn=neco_collate, generator=g)
    total = epochs * len(loader)
    if ctx.quick:
        total = min(total, 2)
    lr_backbone, lr_head = 1e-4, 1e-4
    opt = torch.optim.AdamW(param_groups(neco.student, neco.student_head, lr_backbone, lr_head))
    losses: list[float] = []
    skipped = 0
    t_train = time.perf_counter()
    neco.train()
    step = 0
    while step < total:
        for batch in loader:
            if step >= total:
                break
            batch = {**batch, "crops": [x.to(ctx.device) for x in batch["crops"]], "gc": batch["gc"].to(ctx.device),
                     "all": batch["all"].to(ctx.device)}
            out = neco(batch)
            if not torch.isfinite(out["loss"]):
                skipped += 1
                continue
            neco.commit_queues(out)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            wd = cosine_schedule(step, total, 0.04, 0.5)
            for grp in opt.param_groups:
                grp["lr"] = cosine_schedule(step, total, grp["base_lr"], 0.0)
                if grp["decay"]:
                    grp["weight_decay"] = wd
            neco.ema_step(step, total)  # EMA with the pre-step student (reference order)
            opt.step()
            losses.append(float(out["loss"].detach()))
            step += 1
    t_train = time.perf_counter() - t_train
    after = _scores(neco.student, train, val, c, ks, seeds, ctx.device)
    metrics: dict[str, float | int | str] = {"weights": "random init, then NeCo", "steps": step,
                                             "skipped_nonfinite": skipped, "loss_first": round(losses[0], 5),
                                             "loss_last": round(losses[-1], 5), "train_seconds": round(t_train, 2)}
    for k, v in before.items():
        metrics[f"before/{k}"] = round(v, 4)
        metrics[f"after/{k}"] = round(after[k], 4)
    table = {k: f"{before[k]:.4f} -> {after[k]:.4f}" for k in before}
    table.update({"steps": step, "loss first -> last": f"{losses[0]:.4f} -> {losses[-1]:.4f}"})
    ctx.section(
        "NeCo dense post-training",
        f"demo_vit with RANDOM initialisation (no pretrained weights exist for it), post-trained with NeCo for {step} "
        f"steps ({epochs} epoch(s) of {len(train)} synthetic {S} px scenes, batch {batch_size}, 2 global {S} px + "
        f"4 local {S // 2} px crops, r = 4 -> 16 references, queue 512, s = 100, EMA teacher) in {t_train:.1f} s. "
        f"Overclustering (K = {ks[0]}, {ks[1]}; {len(seeds)} seed(s)) and Hummingbird mIoU of the student's patch "
        f"tokens on {len(val)} validation scenes, before -> after. A random-init model trained for seconds: the "
        "numbers are honest measurements of this toy setting, not the published gains on pretrained DINOv2. "
        "bg_frac is the share of clusters whose majority class is background under many-to-one matching (1.0 means "
        "every cluster maps to background, so the overclustering mIoU is background IoU / classes).",
        table=table)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return metrics
