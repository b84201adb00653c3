"""Demo stage: a short Barlow Twins pretraining of the demo ViT on the synthetic benchmark.

The demo ViT (random init; the foundation stage's model when it ran) is trained with the Barlow Twins core
(two asymmetric torchvision-v2 views, the small 512-512-512 projector, AdamW + warm-up/cosine) for a few dozen
steps; then its attention maps, the cross-correlation heatmap, and linear-probe and overclustering mIoU on the val
scenes are compared with the same network at its random initialisation (the dense-eval ``linear_probe`` and
``overcluster``). The trained backbone goes to ``ctx.cache["bt_backbone"]``.
"""

from __future__ import annotations

import copy
import time

import torch

from ..data.synthetic import num_seg_classes
from ..data.transforms import to_tensor_batch
from ..eval.linear_seg import linear_probe
from ..eval.overcluster import overcluster
from ..methods.barlow_twins import BarlowTwins, TwoViews, barlow_twins_views, warmup_cosine
from ..methods.training import param_groups
from ..viz.callbacks import attention_figure, ccm_figure, ccm_stats, head_attention
from .evaluation import extract
from .foundation import demo_backbone, demo_scenes


def _dense_scores(bb, train, val, c: int, seed: int, quick: bool, device: str) -> dict[str, float]:
    tf, tm, _ = extract(bb.eval(), train, device)
    vf, vm, _ = extract(bb, val, device)
    seeds = (seed,) if quick else (seed, seed + 1, seed + 2)
    oc = overcluster(vf, vm, c, ks=[c, 3 * c], seeds=seeds, niter=50, nredo=1 if quick else 2,
                     eval_size=vm.shape[-1])
    lp = linear_probe(tf, tm, vf, vm, c, lrs=(0.01, 0.1, 1.0), epochs=8 if quick else 25, batch_size=16,
                      eval_size=None, seed=seed, eval_every=0)
    return {"linear/miou": lp.metrics["miou"], f"overcluster/k{c}/miou": oc.metrics[f"k{c}/miou"],
            f"overcluster/k{3 * c}/miou": oc.metrics[f"k{3 * c}/miou"]}


def run(ctx) -> dict[str, float | int | str]:
    t0 = time.perf_counter()
    c = num_seg_classes()
    train, val = demo_scenes(ctx, "train"), demo_scenes(ctx, "val")
    base = ctx.cache.get("backbone") or demo_backbone(ctx)
    random_bb = copy.deepcopy(base).eval()
    # an earlier stage may have frozen the shared backbone (e.g. the density-crop model): the copy we train is ours
    bb = copy.deepcopy(base).train().requires_grad_(True)
    steps = 6 if ctx.quick else 24
    batch = min(64, len(train))
    if batch < 2:
        raise ValueError(f"the barlow demo needs at least 2 training scenes, got {len(train)}")
    model = BarlowTwins(bb, projector="small", pool="cls", lambd=0.0051).to(ctx.device)
    views = TwoViews([{"image": train[i].image} for i in range(len(train))],
                     barlow_twins_views("official", ctx.image_size, bb.mean, bb.std, crop_scale=(0.25, 1.0)))
    opt = torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-3)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    losses, c_sum, c_n = [], None, 0
    g = torch.Generator().manual_seed(ctx.seed)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Barlow Twins global batch")
        for step in range(steps):
            idx = torch.randperm(len(views), generator=g)[:batch].tolist()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # per-image augmentations on small images: threads only add overhead
            try:
                pairs = [views[i] for i in idx]
            finally:
                torch.set_num_threads(threads)
            x1 = torch.stack([p[0] for p in pairs]).to(ctx.device)
            x2 = torch.stack([p[1] for p in pairs]).to(ctx.device)
            loss = model(x1, x2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step >= steps - 5:  # the epoch-mean heatmap of the last 5 steps
                c_sum = model.criterion.last_c.clone() if c_sum is None else c_sum + model.criterion.last_c
                c_n += 1
    t_train = time.perf_counter() - t0
    bb.eval()
    c_train = c_sum / c_n
    stats = ccm_stats(c_train)
    fig_c = ccm_figure(ctx.figures / "barlow_cc_matrix.png", c_train, 128,
                       f"Barlow Twins C (train, mean of last {c_n} steps)")
    n = min(6, len(val))
    x = to_tensor_batch([val[i].image for i in range(n)], bb.mean, bb.std, ctx.device)
    fig_a = attention_figure(ctx.figures / "barlow_attention.png", x, head_attention(bb, x), bb.mean, bb.std,
                             bb.patch_size, 0.6, title=f"after {steps} Barlow Twins steps")
    fig_r = attention_figure(ctx.figures / "barlow_attention_random.png", x, head_attention(random_bb, x),
                             bb.mean, bb.std, bb.patch_size, 0.6, title="random initialisation")
    t1 = time.perf_counter()
    rnd = _dense_scores(random_bb, train, val, c, ctx.seed, ctx.quick, ctx.device)
    btm = _dense_scores(bb, train, val, c, ctx.seed, ctx.quick, ctx.device)
    t_eval = time.perf_counter() - t1
    ctx.cache["bt_backbone"] = bb
    dt = time.perf_counter() - t0
    table = {**{f"random init | {k}": round(v, 4) for k, v in rnd.items()},
             **{f"barlow twins | {k}": round(v, 4) for k, v in btm.items()},
             "loss first -> last": f"{losses[0]:.1f} -> {losses[-1]:.1f}",
             "C mean diagonal": round(stats["mean_diag"], 4),
             "C mean |off-diagonal|": round(stats["mean_abs_offdiag"], 4)}
    ctx.section(
        "Barlow Twins pretraining (short)",
        f"{bb.name} starting from a RANDOM initialisation, trained for {steps} steps of Barlow Twins (batch {batch}, "
        f"two asymmetric views at {ctx.image_size}px, projector 512-512-512, lambda 0.0051, AdamW lr 1e-3 with "
        f"warm-up + cosine; {t_train:.1f} s). A batch of {batch} bounds rank(C) by {batch - 1}, so only "
        f"{min(batch - 1, 512)}/512 dimensions can decorrelate: this is a smoke-scale run, not a converged "
        f"pretraining. Rows compare the network before (random init) and after, on {len(val)} val scenes: linear "
        f"probe (1x1 conv heads, lr 0.01/0.1/1, best on val) and overclustering (K = {c} Hungarian, K = {3 * c} "
        f"many-to-one). Figures: attention after BT, attention at random init, the cross-correlation matrix "
        f"(top-left 128 dims, fixed [-1, 1] scale). {dt:.1f} s in all ({t_eval:.1f} s of evaluation).",
        [fig_a, fig_r, fig_c], table)
    out: dict[str, float | int | str] = {f"random/{k}": v for k, v in rnd.items()}
    out.update({f"bt/{k}": v for k, v in btm.items()})
    change = max(float((a - b).abs().max()) for a, b in zip(random_bb.parameters(), bb.parameters()))
    out.update({"steps": steps, "loss_first": losses[0], "loss_last": losses[-1], "backbone_max_param_change": change,
                "cc/mean_diag": stats["mean_diag"], "cc/mean_abs_offdiag": stats["mean_abs_offdiag"],
                "weights": "random init + Barlow Twins (demo)"})
    return out
