"""2-process CPU DDP (gloo, torch.multiprocessing.spawn) evaluation equals 1 process (docs/eval/index.md item 5)."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _data():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (10, 6, 1), generator=g).expand(10, 6, 6)
    masks = rows.repeat_interleave(4, 1).repeat_interleave(4, 2).clone()
    masks[:, :2, :3] = 255
    feats = F.pad(F.one_hot(rows, 4).float(), (0, 12)) + 0.8 * torch.randn(10, 6, 6, 16, generator=g)
    return feats, masks


def _evaluate(rank: int, world: int) -> dict:
    from dinokit.eval.hummingbird import hummingbird
    from dinokit.eval.metrics import ConfusionMatrix

    feats, masks = _data()
    r = hummingbird(feats[:6], masks[:6], feats[6:], masks[6:], 4, memory_size=None, k=5, backend="torch")
    cm = ConfusionMatrix(4, 4)  # a raw streamed matrix over this rank's shard, all-reduced
    for i in range(rank, 10, world):
        cm.update(masks[i], feats[i, ..., :4].argmax(-1).repeat_interleave(4, 0).repeat_interleave(4, 1))
    cm.all_reduce()
    return {"hb": r.confusion.tolist(), "raw": cm.numpy().tolist(), "miou": r.metrics["miou"]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _evaluate(rank, world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path, monkeypatch):
    # spawned children unpickle ``_worker`` by module name (tests.eval.test_ddp): make the repo root importable
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    one = _evaluate(0, 1)
    out = tmp_path / "ddp.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert np.array_equal(one["hb"], two["hb"]) and np.array_equal(one["raw"], two["raw"])
    assert one["miou"] == two["miou"] and np.asarray(one["hb"]).sum() > 0
