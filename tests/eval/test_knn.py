"""Weighted k-NN: planted clusters give top-1 = 1; k = 1 is exact nearest-neighbour classification; chunked
streaming equals one shot; the vote is DINO's exp(sim / T) sum."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.knn import global_features, knn_classify, nearest_neighbour_labels


def clusters(n_per: int, c: int, d: int = 16, noise: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(c, d, generator=g), dim=1)
    y = torch.arange(c).repeat_interleave(n_per)
    return centres[y] + noise * torch.randn(len(y), d, generator=g), y


def test_planted_clusters_top1_is_one():
    x, y = clusters(40, 6, seed=2)
    train = torch.arange(240) % 4 != 0  # every fourth sample is a query
    mem, mem_y, q, q_y = x[train], y[train], x[~train], y[~train]
    r = knn_classify(mem, mem_y, q, q_y, ks=(1, 10, 20), num_classes=6)
    for k in (1, 10, 20):
        assert r.metrics[f"knn{k}/top1"] == 1.0 and r.metrics[f"knn{k}/top5"] == 1.0
    assert r.n_queries == 60


def test_k1_equals_exact_nearest_neighbour():
    g = torch.Generator().manual_seed(4)
    mem, mem_y = torch.randn(200, 8, generator=g), torch.randint(0, 7, (200,), generator=g)
    q, q_y = torch.randn(90, 8, generator=g), torch.randint(0, 7, (90,), generator=g)
    r = knn_classify(mem, mem_y, q, q_y, ks=(1,), num_classes=7, keep_neighbours=True)
    nn = nearest_neighbour_labels(mem, mem_y, q)
    assert r.metrics["knn1/top1"] == pytest.approx(float(np.mean(nn == q_y.numpy())))
    sims = F.normalize(q, dim=1) @ F.normalize(mem, dim=1).T
    assert torch.equal(r.neighbours[:, 0], sims.argmax(1))


def test_chunked_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(5)
    mem, mem_y = torch.randn(500, 12, generator=g), torch.randint(0, 9, (500,), generator=g)
    q, q_y = torch.randn(77, 12, generator=g), torch.randint(0, 9, (77,), generator=g)
    one = knn_classify(mem, mem_y, q, q_y, ks=(10, 20, 100, 200), num_classes=9, keep_neighbours=True)
    chunked = knn_classify(mem, mem_y, q, q_y, ks=(10, 20, 100, 200), num_classes=9, query_chunk=13,
                           memory_chunk=37, keep_neighbours=True)
    shards = knn_classify(list(mem.split(120)), list(mem_y.split(120)), q, q_y, ks=(10, 20, 100, 200),
                          num_classes=9, memory_chunk=50, keep_neighbours=True)
    assert one.metrics == chunked.metrics == shards.metrics
    assert torch.equal(one.neighbours, chunked.neighbours) and torch.equal(one.neighbours, shards.neighbours)


def test_vote_is_dino_weighted_sum():
    # query (1, 0); memory at cos 1.0 (class 0), 0.8 and 0.6 (class 1): with k = 3 class 1 wins iff
    # exp(0.8/T) + exp(0.6/T) > exp(1/T)
    mem = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    mem_y = torch.tensor([0, 1, 1])
    q, q_y = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    for T in (0.07, 1.0):
        wins = np.exp(0.8 / T) + np.exp(0.6 / T) > np.exp(1.0 / T)
        r = knn_classify(mem, mem_y, q, q_y, ks=(3,), temperature=T, num_classes=2)
        assert r.metrics["knn3/top1"] == float(wins)
    assert not np.exp(0.8 / 0.07) + np.exp(0.6 / 0.07) > np.exp(1 / 0.07)  # the sharp default trusts the nearest
    with pytest.raises(ValueError, match="exceeds the memory"):
        knn_classify(mem, mem_y, q, q_y, ks=(4,))


def test_global_features_kinds():
    from dinokit.backbones import DenseFeatures

    patch = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)
    f = DenseFeatures(patch, torch.ones(2, 4), torch.zeros(2, 0, 4), (2, 3), 16, 11)
    assert torch.equal(global_features(f, "cls"), torch.ones(2, 4))
    assert torch.equal(global_features(f, "avgpool"), patch.mean((1, 2)))
    assert global_features(f, "cls+avgpool").shape == (2, 8)



def test_rank_shards_add_up_to_the_whole(monkeypatch):
    """Each rank scores the queries rank, rank + W, ...; summing the hit counts (the all-reduce) gives the one-process
    numbers. The ranks are simulated by patching the shard function (a real 2-process gloo run of the same sum is
    the pattern of tests/eval/test_ddp.py)."""
    import importlib

    hb = importlib.import_module("dinokit.eval.hummingbird")  # the module (the package exports a function so named)

    g = torch.Generator().manual_seed(7)
    data = (torch.randn(120, 8, generator=g), torch.randint(0, 5, (120,), generator=g),
            torch.randn(31, 8, generator=g), torch.randint(0, 5, (31,), generator=g))
    one = knn_classify(*data, num_classes=5, ks=(1, 10, 20))
    parts = []
    for rank in range(3):
        monkeypatch.setattr(hb, "rank_shard", lambda n, r=rank: list(range(r, n, 3)))
        parts.append(knn_classify(*data, num_classes=5, ks=(1, 10, 20)))
    assert sum(p.n_queries for p in parts) == one.n_queries == 31
    for key, v in one.metrics.items():
        assert sum(p.metrics[key] * p.n_queries for p in parts) / 31 == pytest.approx(v)
