"""Overclustering known answers (docs/eval/overcluster.md item 6) and must-show cases of issue 3."""

import numpy as np
import pytest
import torch

from dinokit.eval._inputs import torch_nearest
from dinokit.eval.overcluster import FeatureMoments, fit_standardised_pca, kmeans, overcluster


def _blobs(n=24, h=6, w=6, c=4, d=16, sigma=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, c, (n, h, w), generator=g)
    means = torch.eye(c, d) * 3
    feats = means[masks] + sigma * torch.randn(n, h, w, d, generator=g)
    return feats, masks


def test_separated_means_k_equals_c_and_3c():
    feats, masks = _blobs()
    r = overcluster(feats, masks, 4, ks=[4, 12], seeds=(0, 1), nredo=2)
    assert r.metrics["k4/miou"] >= 0.99 and r.metrics["k12/miou"] >= 0.99


def test_torch_nearest_blocks():
    m = torch.tensor([[0, 1], [2, 3]])
    up = torch_nearest(m, (100, 100))
    assert (up[:50, :50] == 0).all() and (up[:50, 50:] == 1).all() and (up[50:, :50] == 2).all()
    assert (up[50:, 50:] == 3).all()


def test_same_seed_same_result_and_torch_backend():
    feats, masks = _blobs(seed=3, sigma=0.5)
    a = overcluster(feats, masks, 4, ks=[4, 8], seeds=(0,), nredo=1)
    b = overcluster(feats.numpy(), masks.numpy(), 4, ks=[4, 8], seeds=(0,), nredo=1)
    assert a.metrics == b.metrics
    t = overcluster(feats, masks, 4, ks=[4], seeds=(0,), backend="torch")
    assert t.metrics["k4/miou"] > 0.5


def test_pca_matches_faiss_pcamatrix():
    import faiss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=g) @ torch.randn(32, 32, generator=g) + 3
    pca = fit_standardised_pca(FeatureMoments(32).update(x, chunk=300), 8)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).numpy().astype(np.float32)
    fm = faiss.PCAMatrix(32, 8)
    fm.train(z)
    ref = torch.from_numpy(fm.apply(z))
    ours = pca(x)
    d_ours, d_ref = torch.pdist(ours[:200]), torch.pdist(ref[:200])
    assert torch.allclose(d_ours, d_ref, rtol=1e-4, atol=1e-4 * float(d_ref.mean()))


def test_bad_inputs():
    feats, masks = _blobs(n=2, h=2, w=2)
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        overcluster(feats, masks, 4, ks=[9])
    with pytest.raises(ValueError, match="larger than the number of points"):
        kmeans(np.zeros((3, 2), np.float32), 5)
    bad = masks.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"outside the class set \[0, 4\)"):
        overcluster(feats, bad, 4, ks=[4])
    with pytest.raises(ValueError, match="empty"):
        overcluster(torch.zeros(0, 2, 2, 4), torch.zeros(0, 2, 2, dtype=torch.long), 4, ks=[4])


def test_oracle_permuted_noise_and_monotone():
    from ._synthetic import noisy_oracle, stripes

    cells, masks = stripes(24, seed=5)
    assert overcluster(noisy_oracle(cells, 4, 0.01), masks, 4, ks=[4], seeds=(0,), nredo=3).metrics["k4/miou"] == 1.0
    perm = torch.tensor([3, 0, 1, 2])
    assert overcluster(noisy_oracle(perm[cells], 4, 0.01), masks, 4, ks=[4], seeds=(0,), nredo=3
                       ).metrics["k4/miou"] == 1.0  # features of a permuted labelling: Hungarian undoes it
    scores = [overcluster(noisy_oracle(cells, 4, s, seed=1), masks, 4, ks=[4], seeds=(0, 1), nredo=3
                          ).metrics["k4/miou"] for s in (0.01, 0.3, 0.6, 1.2)]
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)) and scores[-1] < 0.5


def test_ivf_backend_runs():
    from dinokit.eval.hummingbird import knn_search

    g = torch.Generator().manual_seed(0)
    mem, q = torch.randn(2000, 16, generator=g), torch.randn(50, 16, generator=g)
    s, i = knn_search(q, mem, 5, "ivf8-p8")  # nprobe = nlist: exhaustive, equals exact search
    assert torch.equal(i, knn_search(q, mem, 5, "faiss-cpu")[1])
