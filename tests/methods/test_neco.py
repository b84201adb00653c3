"""NeCo core: alignment, queue, head, loss identities, EMA, schedules, groups, DDP parity, NaN policy, export."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffsort import DiffSortNet

from dinokit.backbones import load_backbone
from dinokit.data.synthetic import SyntheticScenes
from dinokit.methods.neco import (
    FeatureQueue,
    NeCo,
    NeCoConfig,
    NeCoDataset,
    NeCoViews,
    ProjectionHead,
    align,
    cosine_schedule,
    draw_indices,
    ema_update_,
    neco_collate,
    pair_loss,
    param_groups,
    similarities,
    sorting_cross_entropy,
)
from dinokit.methods.neco.softsort import soft_sort

TINY = NeCoConfig(head_hidden=32, head_dim=16, roi_size=2, queue_length=64)


def _tiny_neco(cfg: NeCoConfig = TINY, seed: int = 0, world_size: int = 1, rank: int = 0) -> NeCo:
    torch.manual_seed(seed)
    student = load_backbone("tiny_dino", weights="random", drop_path_rate=0.0)
    teacher = load_backbone("tiny_dino", weights="random", drop_path_rate=0.0)
    return NeCo(student, teacher, cfg, world_size=world_size, rank=rank, seed=seed)


def _tiny_batch(n: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    views = NeCoViews(crops=(2, 2), sizes=(32, 16))
    ds = NeCoDataset(SyntheticScenes(n, (48, 48), seed=seed), views)
    return neco_collate([ds[i] for i in range(n)])


# --------------------------------------------------------------------------------------------- alignment
def test_identical_crops_align_bit_identically() -> None:
    maps = torch.randn(3, 8, 6, 6)
    box = torch.tensor([[3.0, 5.0, 40.0, 31.0]] * 3)
    t = align(maps, box, 8, 4)
    s = align(maps.clone(), box.clone(), 8, 4)
    assert t.shape == (3, 8, 4, 4) and torch.equal(t, s)


def test_full_box_returns_map_and_single_token() -> None:
    maps = torch.randn(2, 5, 4, 4)
    full = align(maps, torch.tensor([[0.0, 0, 32, 32]] * 2), 8, 4)
    assert torch.allclose(full, maps, atol=1e-6)
    one = align(maps, torch.tensor([[16.0, 8, 24, 16]] * 2), 8, 1)  # token (row 1, col 2)
    assert torch.allclose(one[:, :, 0, 0], maps[:, :, 1, 2], atol=1e-6)


def test_same_pixels_same_features_through_the_model() -> None:
    model = _tiny_neco()
    x = torch.randn(2, 3, 32, 32)
    a, b = model.encode(model.student, model.student_head, [x, x.clone()])
    box = torch.tensor([[0.0, 0, 32, 32]] * 2)
    assert torch.equal(align(a, box, 16, 2), align(b, box, 16, 2))


# --------------------------------------------------------------------------------------------- queue, head
def test_queue_fifo_and_draws() -> None:
    q = FeatureQueue(4, 2)
    a = torch.tensor([[1.0, 1], [2, 2], [3, 3]])
    b = torch.tensor([[4.0, 4], [5, 5]])
    q.push(a)
    assert int(q.count) == 3
    q.push(b)
    assert torch.equal(q.rows, torch.tensor([[4.0, 4], [5, 5], [1, 1], [2, 2]])) and int(q.count) == 4
    g = torch.Generator().manual_seed(0)
    idx = draw_indices(3, 8, 2, g)
    assert idx.max() < 2
    big = draw_indices(50, 8, 5, g)  # k > L: with replacement, no crash
    assert big.shape == (50,) and big.max() < 5
    with pytest.raises(ValueError, match="empty queue"):
        draw_indices(3, 8, 0, g)
    assert _tiny_neco(NeCoConfig(queue_length=8192, head_hidden=8, head_dim=4), world_size=4).queue_len == 2048


def test_no_zero_reference_is_drawn_while_filling() -> None:
    model = _tiny_neco()
    out = model(_tiny_batch())
    rows, count = out["pending"][0]
    idx = draw_indices(4 * 4, rows.shape[0], int(count), model.generator(rows.device))
    assert (rows[idx].norm(dim=-1) > 0.99).all()


def test_head_output_is_unit_norm() -> None:
    head = ProjectionHead(12, 32, 8, 3)
    z = head(torch.randn(5, 3, 12) * 10)
    assert z.dtype == torch.float32 and torch.allclose(z.norm(dim=-1), torch.ones(5, 3), atol=1e-6)
    assert len([m for m in ProjectionHead(12, 32, 8, 1).modules() if isinstance(m, torch.nn.Linear)]) == 1


# --------------------------------------------------------------------------------------------- loss
def _refs_and_queries(B: int = 2, n: int = 9, E: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, E, 3, 3, generator=g, dtype=torch.float64)
    refs = torch.randn(B, n, E, generator=g, dtype=torch.float64)
    return t, refs


def test_loss_minimal_when_student_and_teacher_agree() -> None:
    t, refs = _refs_and_queries()
    d = similarities(t.flatten(2).transpose(1, 2), refs).requires_grad_()
    _, Q = soft_sort(d.detach(), 100.0)
    _, P = soft_sort(d, 100.0)
    loss = sorting_cross_entropy(Q, P)
    entropy = -(Q * Q.clamp_min(1e-30).log()).sum(-1).mean()
    assert loss.item() == pytest.approx(entropy.item(), abs=1e-10) and loss.item() > 0
    (g,) = torch.autograd.grad(loss, d)
    assert g.abs().max() <= 1e-12  # doubly stochastic: sum of P is constant, so d loss / d d^S = 0 at P = Q
    for seed in range(3):  # Gibbs: any other student input costs more
        other = d.detach() + 0.05 * torch.randn(d.shape, generator=torch.Generator().manual_seed(seed),
                                                dtype=d.dtype)
        _, P2 = soft_sort(other, 100.0)
        assert sorting_cross_entropy(Q, P2) > entropy


def test_pair_loss_invariances_and_dense_transcription() -> None:
    t, refs = _refs_and_queries()
    s = t + 0.3 * torch.randn_like(t)
    base = pair_loss(t.float(), s.float(), refs.float())
    scale = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.5
    assert pair_loss(t.float(), (s * scale).float(), (refs * 3).float()).item() == pytest.approx(base.item(),
                                                                                               abs=1e-5)
    # direct transcription with diffsort's dense path
    ds = DiffSortNet("bitonic", 9, steepness=100.0)
    dT = similarities(t.float().flatten(2).transpose(1, 2), refs.float())
    dS = similarities(s.float().flatten(2).transpose(1, 2), refs.float())
    _, Q = ds(dT.reshape(-1, 9))
    _, P = ds(dS.reshape(-1, 9))
    direct = -(Q * torch.log(P.clamp_min(1e-30))).sum() / (2 * 9 * 9)
    assert base.item() == pytest.approx(direct.item(), abs=1e-6)


def test_loss_finite_at_high_steepness_float32() -> None:
    t, refs = _refs_and_queries()
    loss = pair_loss(t.float(), (t + 0.1).float(), refs.float(), 1e4, 1e4)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------- EMA, schedules, groups
def test_ema_follows_the_formula() -> None:
    t = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    s = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    before = [x.clone() for x in t]
    m = cosine_schedule(3, 10, 0.9995, 1.0)
    ema_update_(t, s, m)
    for a, b, c in zip(t, before, s):
        assert torch.allclose(a, m * b + (1 - m) * c, atol=1e-7, rtol=0)
    assert cosine_schedule(0, 100, 0.9995, 1.0) == pytest.approx(0.9995)
    assert cosine_schedule(50, 100, 0.9995, 1.0) == pytest.approx(0.99975)
    assert cosine_schedule(100, 100, 0.9995, 1.0) == 1.0


def test_model_ema_step_updates_teacher_only() -> None:
    model = _tiny_neco()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.1)
    tb = [p.clone() for p in model.ema_pairs()[0]]
    sb = [p.clone() for p in model.ema_pairs()[1]]
    m = model.ema_step(0, 10)
    for a, b, c in zip(model.ema_pairs()[0], tb, sb):
        assert torch.allclose(a, m * b + (1 - m) * c, atol=1e-6)  # float32 lerp rounding


def test_schedules_and_groups() -> None:
    T = 46_200
    assert cosine_schedule(0, T, 1e-5, 0.0) == pytest.approx(1e-5)
    assert cosine_schedule(T // 2, T, 1e-5, 0.0) == pytest.approx(5e-6)
    assert cosine_schedule(T - 1, T, 1e-5, 0.0) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * (T - 1) / T)))
    assert cosine_schedule(T // 2, T, 0.04, 0.5) == pytest.approx(0.27)
    bb = load_backbone("tiny_dinov2_reg", weights="random")
    head = ProjectionHead(bb.embed_dim, 16, 8)
    groups = param_groups(bb.model, head, 1e-5, 1e-4)
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    names = {id(p): n for n, p in bb.model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"cls_token", "pos_embed", "reg_token"} <= decay
    assert all(n.endswith(".bias") or "norm" in n or ".ls" in n or "gamma" in n for n in no_decay)
    assert any(".ls1." in n for n in no_decay) and "norm.weight" in no_decay
    assert groups[0]["lr"] != groups[2]["lr"] and groups[1]["weight_decay"] == 0.0


def test_step_leaves_teacher_without_grad() -> None:
    model = _tiny_neco()
    out = model(_tiny_batch())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and len(out["pair_losses"]) == 2 * 3
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.teacher_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    groups = param_groups(model.student, model.student_head, 1e-5, 1e-4)
    teacher_ids = {id(p) for p in (*model.teacher.parameters(), *model.teacher_head.parameters())}
    assert not any(id(p) in teacher_ids for g in groups for p in g["params"])


def test_student_drop_path_rates() -> None:
    bb = load_backbone("tiny_dino", weights="random", drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in bb.model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, len(rates)).tolist())


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="sort_net"):
        NeCoConfig(sort_net="merge")
    with pytest.raises(ValueError, match="loss_mask"):
        NeCoConfig(loss_mask="fg")
    with pytest.raises(ValueError, match="steepness"):
        NeCoConfig(student_steepness=float("nan"))
    model = _tiny_neco()
    batch = _tiny_batch()
    with pytest.raises(ValueError, match="gc"):
        model({**batch, "gc": batch["gc"][:, :, :2]})
    with pytest.raises(ValueError, match="references"):
        model(batch, references=torch.randn(4, 3, 16))
    with pytest.raises(ValueError, match="one"):
        align(torch.randn(2, 3, 4, 4), torch.zeros(3, 4), 8, 2)


# --------------------------------------------------------------------------------------------- DDP parity
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refs(B: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(B, 4, 16, generator=torch.Generator().manual_seed(7)), dim=-1)


def _ddp_worker(rank: int, world: int, port: int, out: str, batch: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _tiny_neco(world_size=world, rank=rank)
        ddp = DDP(model)
        B = batch["crops"][0].shape[0]
        h = slice(rank * B // world, (rank + 1) * B // world)
        local = {"crops": [c[h] for c in batch["crops"]], "gc": batch["gc"][h], "all": batch["all"][h]}
        loss = ddp(local, references=_refs(B)[h])["loss"]
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": total / world, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_step_equals_one_process(tmp_path: Path) -> None:
    batch = _tiny_batch(4)
    model = _tiny_neco()
    loss = model(batch, references=_refs(4))["loss"]
    loss.backward()
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert ref
    # the fork start method: the worker lives in this test module, which a spawned interpreter cannot import under
    # pytest's importlib mode
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), batch), nprocs=2, join=True,
                       start_method="fork")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
        assert set(got["grads"]) == set(ref)
        for k, g in ref.items():
            torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------- Lightning, export
FIT_ARGS = dict(backbone="tiny_dino", weights="random", data="synthetic", synthetic_images=8, synthetic_size=48,
                epochs=1, batch_size=2, num_workers=0, lr_backbone=1e-4, crops=(2, 2), sizes=(32, 16),
                head_layers=3, head_hidden=32, head_dim=16, roi_size=2, queue_length=64, accelerator="cpu",
                devices=1, precision="32-true", seed=0)


def test_nan_step_is_skipped_and_the_run_continues(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from dinokit.methods.neco.lightning import NeCoModule

    torch.manual_seed(0)
    neco = _tiny_neco()
    ds = NeCoDataset(SyntheticScenes(4, (48, 48), seed=0), NeCoViews(crops=(2, 2), sizes=(32, 16)))
    module = NeCoModule(neco, 1e-3, 1e-3, total_steps=10)
    before = {k: v.clone() for k, v in neco.state_dict().items()}
    module.inject_nan = True
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ds, batch_size=2, collate_fn=neco_collate))
    assert module.skipped == 1 and module.steps_taken == 0
    for k, v in neco.state_dict().items():  # student, teacher, heads and queues untouched
        assert torch.equal(v, before[k]), k
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ds, batch_size=2, collate_fn=neco_collate))
    assert module.steps_taken == 1 and module.consecutive_skips == 0 and int(neco.queues[0].count) > 0
    assert not torch.equal(neco.teacher_head.mlp[0].weight, before["teacher_head.mlp.0.weight"])


def test_fit_and_export_round_trip(tmp_path: Path) -> None:
    from dinokit.commands.neco import export, fit
    from dinokit.methods.checkpoints import load_checkpoint_backbone

    assert fit(out=tmp_path / "run", **FIT_ARGS) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert export(ckpt, tmp_path / "student.safetensors") == 0
    assert export(ckpt, tmp_path / "teacher.safetensors", which="teacher", with_head=True) == 0
    assert (tmp_path / "teacher.head.safetensors").is_file()
    trained, _, _ = load_checkpoint_backbone(ckpt)
    fresh = load_backbone(weights=str(tmp_path / "student.safetensors"))  # name read from the metadata
    also = load_backbone("tiny_dino", weights=str(tmp_path / "run" / "student.safetensors"))
    teacher = load_backbone("tiny_dino", weights=str(tmp_path / "teacher.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trained.eval().forward_features(x).patch
        assert torch.equal(fresh.eval().forward_features(x).patch, ref)
        assert torch.equal(also.eval().forward_features(x).patch, ref)
        assert not torch.equal(teacher.eval().forward_features(x).patch, ref)
    with pytest.raises(FileNotFoundError, match="neco fit"):
        export(tmp_path / "missing.ckpt")


PUBLISHED = {  # config: (backbone, batch, epochs, lr_backbone, references, global size) of docs/methods/neco.md
    "dinov2_vits14": ("dinov2_vits14", 64, 25, 1e-5, "queue", 518),
    "dinov2r_vits14": ("dinov2_vits14_reg", 64, 25, 1e-5, "queue", 518),
    "dinov2r_xr_vits14": ("dinov2_vits14", 64, 25, 1e-5, "queue", 518),
    "dinov2_vitb14": ("dinov2_vitb14", 16, 25, 5e-6, "queue", 518),
    "dinov2r_vitb14": ("dinov2_vitb14_reg", 16, 25, 1e-6, "queue", 518),
    "dinov2r_xr_vitb14": ("dinov2_vitb14", 16, 25, 1e-6, "queue", 518),
    "dino_vits16": ("dino_vits16", 45, 50, 1e-5, "batch", 224),
    "ablation_224": ("dinov2_vits14_reg", 55, 50, 1e-6, "batch", 224),
}


@pytest.mark.parametrize("name", [*PUBLISHED, "tiny"])
def test_configs_match_the_published_settings(name: str) -> None:
    import inspect

    import yaml

    from dinokit.commands.neco import fit

    path = Path(__file__).parents[2] / "configs" / "neco" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= set(inspect.signature(fit).parameters), set(cfg) - set(inspect.signature(fit).parameters)
    if name == "tiny":
        return
    bb, B, ep, lr, ref, g = PUBLISHED[name]
    assert (cfg["backbone"], cfg["batch_size"], cfg["epochs"], cfg["reference_source"]) == (bb, B, ep, ref)
    assert cfg["lr_backbone"] == pytest.approx(lr) and cfg["sizes"] == [g, 98] and cfg["lr_head"] == 1e-4
    assert (cfg["roi_size"], cfg["queue_length"], cfg["head_dim"], cfg["seed"]) == (7, 8192, 256, 400)
    assert cfg.get("drop_registers", False) == ("xr" in name)
    assert cfg["pos_interp"] == ("offset" if name.startswith("dinov2r") else "official")


def test_accumulation_gives_one_ema_update_per_optimiser_step() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from dinokit.methods.neco.lightning import NeCoModule

    neco = _tiny_neco()
    calls: list[tuple[int, int]] = []
    original = neco.ema_step
    neco.ema_step = lambda t, total: (calls.append((t, total)), original(t, total))[1]
    ds = NeCoDataset(SyntheticScenes(8, (48, 48), seed=0), NeCoViews(crops=(2, 2), sizes=(32, 16)))
    module = NeCoModule(neco, 1e-4, 1e-4, total_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ds, batch_size=2, collate_fn=neco_collate))
    assert calls == [(0, 1)] and module.steps_taken == 1  # 4 micro-batches, one optimiser step, one EMA update
