"""The RASA stage loop, pure torch: one fresh position probe per stage, the stopping rule, the audit probe, resumable
stage checkpoints, validation with the removal cosines, a fit on precomputed tokens, per-stage metric hooks and the
stage curve. See docs/methods/rasa.md.

How a probe is trained is a callback of :func:`run_stages`: :func:`fit_rasa_features` trains on token tensors here;
:func:`dinokit.methods.rasa.lightning.fit_rasa_backbone` trains through a ``lightning.Trainer`` on a frozen backbone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...eval.position import chance_mse
from .checkpoint import load_rasa_head
from .head import RASACheckpointError, RASAHead, activate, flat_position_targets, probe_mse, project_off, rasa_basis

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- records
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


# --------------------------------------------------------------------------------------------- stage loop
def _write_progress(out_dir: Path, head: RASAHead, records: list[StageRecord], done: str | None) -> None:
    from ...io import atomic_write_text

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
    """The stage loop (stopping rule, audit probe, checkpoints; see docs/methods/rasa.md), independent of how a
    probe is trained.

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


# --------------------------------------------------------------------------------------------- one probe
def cosine_lr(step: int, total: int) -> float:
    """Cosine factor 0.5 (1 + cos(pi min(step, total) / max(total, 1))): 1 at step 0, 0 from step ``total`` on
    (optimiser steps, no warm-up)."""
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
    the removal cosines are added: ``val/cos_pe_removed``, ``val/cos_pe_residual``, ``val/cos_x_removed``,
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
        y = flat_position_targets(h, w, x.device)
        pred = activate(xp.reshape(B, h * w, D) @ W.to(x.device).T, head.activation)
        se += float((pred - y).pow(2).sum())
        sq0 += chance_mse(h, w) * (B * h * w * 2)  # the constant 0.5's squared error summed over this batch
        n += B * h * w * 2
        if pos_embed is not None:
            pe = pos_embed(h, w)
            if pe is not None:
                x2 = xp.reshape(-1, D)
                resid = project_off(x2, U.to(x.device, torch.float32))
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


# --------------------------------------------------------------------------------------------- feature-level fit
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


# --------------------------------------------------------------------------------------------- per-stage metrics
def entropy_stage_metrics(in_size: int, dataset: str = "val", k: int = 100, seeds: Sequence[int] = (0,),
                          max_tokens: int = 400_000) -> Callable[[RASAHead, list[torch.Tensor]], dict[str, float]]:
    """Per-stage spatial entropy ``se1`` (see docs/eval/entropy.md) of raw vs debiased (through stage t) val tokens.

    Keys ``{dataset}/feat-{raw|debiased}/spatial_entropy/se1/in{in_size}/k{K}/se`` (at most ``max_tokens`` tokens).
    """
    from ...eval.entropy import spatial_entropy_of_features

    def fn(head: RASAHead, batches: list[torch.Tensor]) -> dict[str, float]:
        raw = torch.cat(batches)
        n = max(1, min(raw.shape[0], max_tokens // max(1, raw.shape[1] * raw.shape[2])))
        raw = raw[:n]
        h, w = raw.shape[1:3]
        kk = min(k, raw.shape[0] * h * w)
        out = {}
        for name, feats in (("raw", raw), ("debiased", head(raw))):
            se = spatial_entropy_of_features(feats, k=kk, seeds=tuple(seeds))
            out[f"{dataset}/feat-{name}/spatial_entropy/se1/in{in_size}/k{kk}/se"] = se["se"]
        return out

    return fn


def overcluster_stage_metrics(masks: torch.Tensor, num_classes: int, in_size: int, dataset: str = "val",
                              ks: Sequence[int | None] = (500, 300, None), seeds: Sequence[int] = (1,),
                              ignore_index: int | None = 255
                              ) -> Callable[[RASAHead, list[torch.Tensor]], dict[str, float]]:
    """Per-stage overclustering mIoU of raw vs debiased tokens of the first ``len(masks)`` val images.

    ``masks``: (n, S, S) int64 labels at the validation size. Runs dinokit's ``fast100`` pipeline (standardise,
    PCA-50, faiss k-means, 100x100 evaluation; ``None`` in ``ks`` = the number of classes, Hungarian) - not the
    ``train100`` pixel-upsampled variant of docs/methods/rasa.md. Keys
    ``{dataset}/feat-{raw|debiased}/overcluster/fast100/in{S}/n{n}/k{K}/miou``. The raw score is computed once.
    """
    from ...eval.overcluster import overcluster

    n = int(masks.shape[0])
    cache: dict[str, dict[str, float]] = {}

    def fn(head: RASAHead, batches: list[torch.Tensor]) -> dict[str, float]:
        raw = torch.cat(batches)[:n]
        tokens = raw.shape[0] * raw.shape[1] * raw.shape[2]
        kk = sorted({num_classes if k is None else int(k) for k in ks} & set(range(1, tokens + 1)), reverse=True)
        out: dict[str, float] = {}
        for name in ("raw", "debiased"):
            if name in cache:
                out.update(cache[name])
                continue
            feats = raw if name == "raw" else head(raw)
            r = overcluster(feats, masks[:raw.shape[0]], num_classes, ks=kk, seeds=tuple(seeds),
                            ignore_index=ignore_index)
            m = {f"{dataset}/feat-{name}/overcluster/fast100/in{in_size}/n{raw.shape[0]}/k{k}/miou":
                 r.metrics[f"k{k}/miou"] for k in kk}
            if name == "raw":
                cache[name] = m
            out.update(m)
        return out

    return fn


# --------------------------------------------------------------------------------------------- stage curve
def stage_curve_data(records: list[StageRecord]) -> dict[str, list]:
    """The per-stage validation curve: ``stage``, ``mse`` (fresh probe), ``chance``, ``r2``, ``committed``,
    ``metrics``, one entry per record."""
    return {"stage": [r.stage for r in records], "mse": [r.mse for r in records],
            "chance": [r.chance for r in records], "r2": [r.r2 for r in records],
            "committed": [r.committed for r in records], "metrics": [r.metrics for r in records]}


def stage_curve(records: list[StageRecord], path_png: Path, path_json: Path, title: str = "RASA") -> None:
    """Write the per-stage validation curve (MSE of each fresh probe vs chance) as a PNG and a JSON file."""
    from ...io import atomic_write_text
    from ...viz.figures import save_rasa_stage_curve

    payload = stage_curve_data(records)
    atomic_write_text(path_json, json.dumps(payload, indent=1))
    save_rasa_stage_curve(path_png, payload["stage"], payload["mse"], payload["chance"], payload["committed"],
                          title=title)
