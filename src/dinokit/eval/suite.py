"""One call for before/after numbers: overclustering, linear probe and Hummingbird on cached features.

Used by the demo stages (evaluation, RASA, NeCo, Barlow Twins) to report dense-feature quality with the same small,
fixed settings. Everything is evaluated at the mask resolution (the ``fast100@S`` analogue of the spec), seeded.
"""

from __future__ import annotations

import numpy as np
import torch

from ._inputs import MaskLike, as_features, as_masks


def dense_eval_suite(train_feats: torch.Tensor | np.ndarray, train_masks: MaskLike,
                     val_feats: torch.Tensor | np.ndarray, val_masks: MaskLike, num_classes: int, seed: int = 0,
                     ignore_index: int | None = 255, quick: bool = False, overcluster_ks: tuple[int, ...] | None = None,
                     linear_lrs: tuple[float, ...] = (0.01, 0.1, 1.0), linear_epochs: int | None = None,
                     position: bool = False) -> dict[str, float]:
    """Dense evaluation of one feature set with small, fixed settings.

    Args:
        train_feats: (N, h, w, D) patch tokens of the train split (memory of Hummingbird, probe training data).
        train_masks: (N, H, W) int masks, H and W multiples of h and w (pixel masks of the same images).
        val_feats: (B, h, w, D) patch tokens of the val split; val_masks (B, H, W).
        num_classes: C (ids 0..C-1 plus ``ignore_index``).
        seed: k-means / memory sampling / probe seed.
        quick: fewer k-means restarts and probe steps (tests, ``ctx.quick``).
        linear_lrs: learning rates of the stacked linear heads (best on val reported).
        linear_epochs: probe epochs (default: enough for ~200 SGD steps of 16 images, ~30 when ``quick``).
        overcluster_ks: K list (default ``(C, 3C)``, capped at the number of val tokens).
        position: also run the sigmoid position probe (``position/mse``, ``position/chance``, ``position/r2``).
    Returns:
        flat dict: ``overcluster/k{K}/miou`` (K = C Hungarian, others many-to-one), ``linear/miou``,
        ``linear/best_lr``, ``hummingbird/miou`` (memory = all train cells, k = min(30, cells), β 0.02, Hungarian),
        optionally ``position/*``; all fractions in [0, 1].
    """
    from .hummingbird import hummingbird
    from .linear_seg import linear_probe
    from .overcluster import overcluster

    tf, vf = as_features(train_feats, "train features"), as_features(val_feats, "val features")
    vm = as_masks(val_masks, vf.shape[0], "val masks")
    tm = as_masks(train_masks, tf.shape[0], "train masks")
    size = int(vm.shape[-1]) if isinstance(vm, torch.Tensor) else None
    n_val_tokens = vf.shape[0] * vf.shape[1] * vf.shape[2]
    ks = [k for k in (overcluster_ks or (num_classes, 3 * num_classes)) if k <= n_val_tokens]
    out: dict[str, float] = {}
    oc = overcluster(vf, vm, num_classes, ks=ks, seeds=(seed,), nredo=1 if quick else 3, niter=50 if quick else 100,
                     eval_size=size or 100, ignore_index=ignore_index)
    out.update({f"overcluster/{k}": v for k, v in oc.metrics.items() if k.endswith("/miou")})
    bs = 16
    epochs = linear_epochs or -(-(30 if quick else 200) // max(1, tf.shape[0] // bs))  # ~60 / 200 SGD steps
    lp = linear_probe(tf, tm, vf, vm, num_classes, lrs=linear_lrs, epochs=epochs, batch_size=bs, eval_size=None,
                      ignore_index=ignore_index, seed=seed, eval_every=0)
    out["linear/miou"] = lp.metrics["miou"]
    out["linear/best_lr"] = lp.metrics["best_lr"]
    cells = tf.shape[0] * tf.shape[1] * tf.shape[2]
    hb = hummingbird(tf, tm, vf, vm, num_classes, k=min(30, cells), memory_size=None, ignore_index=ignore_index,
                     seed=seed)
    out["hummingbird/miou"] = hb.metrics["miou"]
    if position:
        from .position import position_probe

        pp = position_probe(tf, vf, epochs=5 if quick else 20, lr=1e-2, batch_size=16, seed=seed)
        out.update({f"position/{k}": pp.metrics[k] for k in ("mse", "chance", "r2")})
    return out
