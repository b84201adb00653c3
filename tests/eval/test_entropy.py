"""Spatial entropy se1 closed forms (docs/eval/entropy.md item 10)."""

import numpy as np
import pytest
import torch

from dinokit.eval.entropy import spatial_entropy, spatial_entropy_of_features


def test_position_clusters_give_zero_and_shuffle_ceiling():
    lab = np.tile(np.arange(16), (1000, 1))
    r = spatial_entropy(lab)
    assert r["se"] == pytest.approx(0, abs=1e-12) and r["nmi_pos"] == pytest.approx(1)
    assert r["se_shuffled"] >= 0.99


def test_one_cluster_per_image_gives_one():
    rng = np.random.default_rng(0)
    lab = np.repeat(rng.integers(0, 5, size=(40, 1)), 16, axis=1)
    assert spatial_entropy(lab)["se"] == pytest.approx(1.0, abs=1e-12)


def test_mutual_information_identity_and_relabel_invariance():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 6, size=(50, 3, 3))
    lab[:, 0, 0] = 0  # some position dependence
    r = spatial_entropy(lab)
    flat = lab.reshape(50, 9)
    joint = np.zeros((6, 9))
    np.add.at(joint, (flat, np.broadcast_to(np.arange(9), flat.shape)), 1)
    p = joint / joint.sum()
    pc, pp = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / (pc @ pp)[nz])).sum()
    assert r["se"] == pytest.approx(1 - mi / np.log(9), abs=1e-9)
    perm = rng.permutation(6)
    assert spatial_entropy(perm[lab])["se"] == pytest.approx(r["se"], abs=1e-12)


def test_feature_pipeline_and_errors():
    g = torch.Generator().manual_seed(0)
    pos = torch.eye(16).view(4, 4, 16)
    r = spatial_entropy_of_features(pos.expand(20, 4, 4, 16) + 0.01 * torch.randn(20, 4, 4, 16, generator=g),
                                    k=16, seeds=(0,), nredo=1)
    assert r["se"] < 0.1 and r["se_ratio"] < 0.1  # k-means may merge a pair of positions
    with pytest.raises(ValueError, match="N >= 2"):
        spatial_entropy(np.zeros((3, 1), int))
