"""Hummingbird retrieval: oracle, noise, monotonicity, memory arithmetic, backends (docs/eval/hummingbird.md item 8)."""

import numpy as np
import pytest
import torch

from dinokit.eval.hummingbird import (
    build_memory,
    hummingbird,
    knn_search,
    memory_quota,
    sample_cells,
    select_subset,
    soft_cell_labels,
    soft_predict,
)
from dinokit.eval.metrics import miou

from ._synthetic import noisy_oracle, stripes


def test_oracle_features_give_one():
    cells, masks = stripes(24, seed=0)
    vcells, vmasks = stripes(8, seed=1)
    r = hummingbird(noisy_oracle(cells, 4, 0.0), masks, noisy_oracle(vcells, 4, 0.0), vmasks, 4, memory_size=None,
                    backend="faiss-cpu")
    assert r.metrics["miou"] == 1.0
    # memory = val images, k = 1, unbounded -> exact
    f = noisy_oracle(vcells, 4, 0.01)
    assert hummingbird(f, vmasks, f, vmasks, 4, k=1, memory_size=None).metrics["miou"] == 1.0


def test_permuted_memory_labels_are_one_under_hungarian():
    cells, masks = stripes(16, seed=2)
    perm = torch.tensor([2, 3, 0, 1])
    f = noisy_oracle(cells, 4, 0.0)
    r = hummingbird(f, perm[masks], f, masks, 4, memory_size=None)
    assert r.metrics["miou"] == 1.0
    assert hummingbird(f, perm[masks], f, masks, 4, memory_size=None, matching="none").metrics["miou"] == 0.0


def test_noise_near_chance_and_monotone():
    cells, masks = stripes(32, seed=3)
    vcells, vmasks = stripes(16, seed=4)
    scores = [hummingbird(noisy_oracle(cells, 4, s, seed=5), masks, noisy_oracle(vcells, 4, s, seed=6), vmasks, 4,
                          memory_size=None).metrics["miou"] for s in (0.0, 0.2, 0.4, 0.8, 1.6)]
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)) and scores[0] == 1.0
    g = torch.Generator().manual_seed(0)
    noise = hummingbird(torch.randn(32, 6, 6, 16, generator=g), masks, torch.randn(16, 6, 6, 16, generator=g), vmasks,
                        4, memory_size=None).metrics["miou"]
    rand = miou(vmasks, torch.randint(0, 4, vmasks.shape, generator=g), 4, matching="hungarian")
    assert abs(noise - rand) < 0.1 and scores[-1] < 0.5


def test_quota_and_sampling():
    assert memory_quota(102_400, 10_582, 2) == 4 and 10_582 * 2 * 4 == 84_656
    assert memory_quota(10, 100, 2) == 1 and memory_quota(None, 5) is None
    labels = torch.zeros(5, 3)
    labels[:4, 0] = 1
    labels[4, 2] = 1  # a rare class in cell 4
    keep = sample_cells(labels, 1, torch.Generator().manual_seed(0))
    assert keep.tolist() == [4]
    cells, masks = stripes(10, seed=7)
    mem = build_memory(noisy_oracle(cells, 4, 0.1), masks, 4, memory_size=30)
    assert len(mem) == 30 and torch.allclose(mem.features.norm(dim=1), torch.ones(30))


def test_soft_labels_sum_to_one_and_ignore():
    m = torch.tensor([[[0, 1], [255, 2]]])
    lab = soft_cell_labels(m, (1, 1), 3)
    assert torch.allclose(lab, torch.tensor([[[[0.5, 0.25, 0.25]]]]))
    with pytest.raises(ValueError, match="not a multiple"):
        soft_cell_labels(torch.zeros(1, 5, 5, dtype=torch.long), (2, 2), 3)


def test_backends_agree_and_weights():
    g = torch.Generator().manual_seed(0)
    mem, q = torch.randn(3000, 32, generator=g), torch.randn(200, 32, generator=g)
    s1, i1 = knn_search(q, mem, 10, "torch", chunk=700, query_chunk=64)
    s2, i2 = knn_search(q, mem, 10, "faiss-cpu")
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-4)
    cells, masks = stripes(4, seed=8)
    bank = build_memory(noisy_oracle(cells, 4, 0.3), masks, 4, memory_size=None)
    y = soft_predict(torch.randn(50, 16, generator=g), bank, k=5)
    assert torch.allclose(y.sum(1), torch.ones(50), atol=1e-5)
    # beta -> 0 gives the 1-NN label
    qq = torch.randn(20, 16, generator=g)
    nn1 = bank.labels[knn_search(qq, bank.features, 1)[1][:, 0]]
    assert torch.allclose(soft_predict(qq, bank, k=5, beta=1e-6), nn1, atol=1e-4)
    with pytest.raises(ValueError, match="neighbours requested"):
        knn_search(q, mem[:5], 10, "torch")


def test_subset_and_bad_inputs():
    s = select_subset(100, 1 / 8, seed=42)
    assert len(s) == 12 and s == sorted(s) and s == select_subset(100, 1 / 8, seed=42)
    cells, masks = stripes(4)
    bad = masks.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match="outside the class set"):
        hummingbird(noisy_oracle(cells, 4, 0), masks, noisy_oracle(cells, 4, 0), bad, 4, memory_size=None)
    with pytest.raises(ValueError, match="empty"):
        hummingbird(noisy_oracle(cells, 4, 0), masks, torch.zeros(0, 6, 6, 16), np.zeros((0, 24, 24), int), 4)


def test_streaming_builder_and_evaluator_match_one_shot():
    from dinokit.eval.hummingbird import HummingbirdEvaluator, MemoryBuilder

    cells, masks = stripes(12, seed=9)
    f = noisy_oracle(cells, 4, 0.5, seed=2)
    one = build_memory(f, masks, 4, memory_size=60)
    mb = MemoryBuilder(4, 12, memory_size=60)
    for s in (0, 5, 7):
        e = {0: 5, 5: 7, 7: 12}[s]
        mb.add(f[s:e], masks[s:e])
    two = mb.build()
    assert torch.equal(one.features, two.features) and torch.equal(one.labels, two.labels)
    ev = HummingbirdEvaluator(one, 4, k=5)
    ev.update(f[:3], masks[:3])
    ev.update(f[3:], masks[3:])
    assert np.array_equal(ev.compute().confusion, hummingbird(one, None, f, masks, 4, k=5).confusion)
