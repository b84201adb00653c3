"""Hummingbird and overclustering on the device against their CPU results.

Hummingbird: memory and queries on the device with the chunked torch kNN (and faiss-gpu when this faiss has GPUs)
vs the CPU (torch and faiss-cpu): the same memory rows, the same neighbours for >= 99.9 % of the queries, scores
within 1e-5, confusion matrices differing on <= 0.1 % of the pixels and mIoU within 1e-3. Overclustering: features
handed over on the device give the CPU's metrics (PCA and k-means are seeded; equal to 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.hummingbird import build_memory, hummingbird, knn_search, resolve_backend
from dinokit.eval.overcluster import overcluster

from ._parity import assert_close, generator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
C, P = 4, 4  # classes, pixels per cell side


def _stripes(n: int, seed: int, h: int = 6, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell labels constant along rows (n, h, w) and the pixel masks (n, h P, w P)."""
    rows = torch.randint(0, C, (n, h, 1), generator=generator(seed)).expand(n, h, w)
    return rows, rows.repeat_interleave(P, 1).repeat_interleave(P, 2)


def _noisy_oracle(cells: torch.Tensor, sigma: float, seed: int, d: int = 16) -> torch.Tensor:
    """One-hot class in the first C of d dims plus N(0, sigma^2) noise: (n, h, w, d) fp32."""
    onehot = F.pad(F.one_hot(cells, C).float(), (0, d - C))
    return onehot + sigma * torch.randn(onehot.shape, generator=generator(seed))


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().sort(1).values == b.cpu().sort(1).values).all(1).float().mean())


def _assert_same_result(dev, cpu, what: str) -> None:
    n = int(cpu.confusion.sum())
    diff = int(abs(dev.confusion.astype("int64") - cpu.confusion.astype("int64")).sum())
    assert diff <= 1e-3 * 2 * n, f"{what}: confusion matrices differ on {diff / 2} of {n} pixels"
    assert abs(dev.metrics["miou"] - cpu.metrics["miou"]) <= 1e-3, (what, dev.metrics["miou"], cpu.metrics["miou"])
    assert dev.metrics["mem_rows"] == cpu.metrics["mem_rows"]


def check_hummingbird(device: str) -> None:
    cells, masks = _stripes(24, seed=0)
    vcells, vmasks = _stripes(12, seed=1)
    tf, vf = _noisy_oracle(cells, 0.6, seed=2), _noisy_oracle(vcells, 0.6, seed=3)
    # memory built from device features: the same sampled rows (CPU generators), features equal to 1e-6
    mc, md = build_memory(tf, masks, C, memory_size=288), build_memory(tf.to(device), masks, C, memory_size=288)
    assert len(mc) == len(md) == 288 and torch.equal(md.labels.cpu(), mc.labels)
    assert_close("memory features", md.features, mc.features, rtol=0, atol=1e-6)
    # exact kNN: device torch vs CPU torch and faiss-cpu
    q = vf.reshape(-1, vf.shape[-1])
    s_c, i_c = knn_search(q, mc.features, 30, "torch", chunk=128)
    s_f, i_f = knn_search(q, mc.features, 30, "faiss-cpu")
    s_d, i_d = knn_search(q.to(device), md.features, 30, "torch", chunk=128)
    assert i_d.device.type == torch.device(device).type
    assert _same_sets(i_d, i_c) >= 0.999 and _same_sets(i_d, i_f) >= 0.999
    assert_close("kNN scores", s_d, s_c, rtol=0, atol=1e-5)
    # the whole evaluation
    kw = dict(num_classes=C, memory_size=288, k=30)
    ref = hummingbird(tf, masks, vf, vmasks, backend="torch", **kw)
    ref_faiss = hummingbird(tf, masks, vf, vmasks, backend="faiss-cpu", **kw)
    _assert_same_result(ref_faiss, ref, "faiss-cpu vs torch on the CPU")
    assert 0.3 < ref.metrics["miou"] < 1.0  # noisy enough that errors would show, far above chance
    dev = hummingbird(tf.to(device), masks, vf.to(device), vmasks, backend="torch", **kw)
    _assert_same_result(dev, ref, f"torch on {device}")
    if torch.device(device).type == "cuda" and resolve_backend("auto") == "faiss-gpu":
        gpu = hummingbird(tf.to(device), masks, vf.to(device), vmasks, backend="faiss-gpu", **kw)
        _assert_same_result(gpu, ref_faiss, "faiss-gpu vs faiss-cpu")


def _blobs(n: int = 16, h: int = 6, w: int = 6, d: int = 16, sigma: float = 0.6, seed: int = 0):
    masks = torch.randint(0, C, (n, h, w), generator=generator(seed))
    feats = torch.eye(C, d)[masks] * 3 + sigma * torch.randn(n, h, w, d, generator=generator(seed + 1))
    return feats, masks


def check_overcluster(device: str) -> None:
    feats, masks = _blobs()
    for backend in ("faiss", "torch"):
        kw = dict(ks=[C, 12], seeds=(0, 1), niter=10, nredo=1, backend=backend)
        ref = overcluster(feats, masks, C, **kw)
        dev = overcluster(feats.to(device), masks, C, **kw)
        assert ref.metrics.keys() == dev.metrics.keys()
        for k, v in ref.metrics.items():
            assert abs(dev.metrics[k] - v) <= 1e-6, (backend, k, dev.metrics[k], v)
        assert ref.metrics["k4/miou"] > 0.5


CHECKS = [check_hummingbird, check_overcluster]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_gpu_eval(check) -> None:
    check("cuda")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_self_check_on_cpu(check) -> None:
    check("cpu")
