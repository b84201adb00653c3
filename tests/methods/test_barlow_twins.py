import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dinokit.methods.barlow_twins import (
    BarlowTwins,
    BarlowTwinsLoss,
    Projector,
    barlow_twins_views,
    convert_batchnorm,
    cross_correlation,
    parse_projector_dims,
    warmup_cosine,
)


def _hadamard_views() -> torch.Tensor:
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h[:, 1:]  # columns 2..8: zero mean, orthogonal, biased std 1


def test_hadamard_views_give_identity_and_zero_loss():
    z = _hadamard_views().double()
    crit = BarlowTwinsLoss(eps=0.0)
    assert crit(z, z).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(crit.last_c, torch.eye(7, dtype=torch.float32))
    assert BarlowTwinsLoss(eps=1e-5)(z.float(), z.float()).item() <= 1e-8


def _hand_loss(a: np.ndarray, b: np.ndarray, unbiased: bool, eps: float, lambd: float) -> tuple[float, np.ndarray]:
    B, D = a.shape
    dof = B - 1 if unbiased else B

    def std(z):
        out = np.zeros_like(z)
        for j in range(D):
            col = z[:, j]
            mu = sum(col) / B
            var = sum((v - mu) ** 2 for v in col) / dof
            out[:, j] = (col - mu) / np.sqrt(var + eps)
        return out

    sa, sb = std(a), std(b)
    c = np.zeros((D, D))
    for i in range(D):
        for j in range(D):
            c[i, j] = sum(sa[k, i] * sb[k, j] for k in range(B)) / B
    loss = sum((1 - c[i, i]) ** 2 for i in range(D)) + lambd * sum(c[i, j] ** 2 for i in range(D) for j in range(D)
                                                                   if i != j)
    return loss, c


@pytest.mark.parametrize("norm", ["batchnorm", "unbiased"])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_loss_matches_hand_computation(norm, eps):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    crit = BarlowTwinsLoss(lambd=0.05, norm=norm, eps=eps)
    ref, c = _hand_loss(a.numpy(), b.numpy(), norm == "unbiased", eps, 0.05)
    assert crit(a, b).item() == pytest.approx(ref, abs=1e-6)
    np.testing.assert_allclose(crit.last_c.numpy(), c, atol=1e-6)


def test_unbiased_is_scaled_batchnorm_and_floor():
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    c_bn, c_u = cross_correlation(a, b, "batchnorm", 0.0), cross_correlation(a, b, "unbiased", 0.0)
    torch.testing.assert_close(c_u, (5 / 6) * c_bn)
    # identical views: the unbiased diagonal is (B-1)/B, an invariance floor of D/B^2
    crit = BarlowTwinsLoss(lambd=0.0, norm="unbiased", eps=0.0)
    assert crit(a, a).item() == pytest.approx(5 / 36, rel=1e-9)


def test_lambda_zero_swap_and_gradcheck():
    a = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    crit0 = BarlowTwinsLoss(lambd=0.0)
    loss0 = crit0(a, b)
    assert loss0.item() == pytest.approx(((1 - torch.diagonal(crit0.last_c.double())) ** 2).sum().item(), rel=1e-6)
    crit = BarlowTwinsLoss(lambd=0.3)
    lab = crit(a, b).item()
    c_ab = crit.last_c
    lba = crit(b, a).item()
    torch.testing.assert_close(crit.last_c, c_ab.T)
    assert lab == pytest.approx(lba, rel=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: BarlowTwinsLoss(lambd=0.3)(x, y), (a, b))


def test_last_c_is_a_detached_copy_with_intact_diagonal():
    a = torch.randn(16, 4)
    crit = BarlowTwinsLoss()
    crit(a, a)
    diag = torch.diagonal(crit.last_c).clone()
    assert not crit.last_c.requires_grad and crit.last_c.dtype == torch.float32
    assert torch.all(diag > 0.99)
    assert set(crit.last_terms) == {"on_diag", "off_diag"}


def test_loss_is_fp32_under_autocast():
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss()(a.bfloat16(), b.bfloat16())
    assert loss.dtype == torch.float32


def test_batch_of_one_raises_and_small_batch_warns():
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.warns(UserWarning, match="B=8 < 64"):
        BarlowTwinsLoss()(torch.randn(8, 4), torch.randn(8, 4))


def test_projector_parameter_counts_and_errors():
    p = Projector(384, "official")
    n = sum(t.numel() for t in p.parameters())
    assert n == 384 * 8192 + 2 * (2 * 8192 + 8192 * 8192)
    small = Projector(96, "small")
    assert sum(t.numel() for t in small.parameters()) == 96 * 512 + 2 * (2 * 512 + 512 * 512)
    assert parse_projector_dims("64-32") == [64, 32]
    assert isinstance(small[-1], nn.Linear) and small[-1].bias is None  # no final BN / ReLU
    with pytest.raises(ValueError, match="at least one positive width"):
        parse_projector_dims("")
    with pytest.raises(ValueError, match="embedding width"):
        small(torch.randn(4, 95))
    bb = nn.Linear(8, 16)
    bb.embed_dim = 16
    with pytest.raises(ValueError, match="does not fit the backbone's embedding width 16"):
        BarlowTwins(bb, "32-32", projector_in=12)


def test_model_batch_of_one_raises():
    from dinokit.backbones import load_backbone

    m = BarlowTwins(load_backbone("tiny_dino", "random"), "32-32")
    with pytest.raises(ValueError, match="at least 2 images"):
        m(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))


def test_views_are_asymmetric_and_normalised():
    t1, t2 = barlow_twins_views(size=32)
    img = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    v1, v2 = t1(img), t2(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    names1 = [type(t).__name__ for t in t1.transforms]
    assert "RandomSolarize" in names1
    assert t1.transforms[-3].p == 0.0 and t2.transforms[-3].p == 0.2  # solarize
    assert t1.transforms[-4].p == 1.0 and t2.transforms[-4].p == 0.1  # blur


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == 0.0
    assert warmup_cosine(5, 100, 10) == 0.5
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.001)
    assert warmup_cosine(150, 100, 10) == pytest.approx(0.001)  # never restarts


# ------------------------------------------------------------------------------------------- DDP parity
class _Encoder(nn.Module):
    """A ResNet-like encoder with a BatchNorm (so SyncBN semantics matter)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))
        self.embed_dim = 10

    def forward(self, x):
        return self.net(x)


def _model() -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins(_Encoder(), "16-16", lambd=0.05)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = convert_batchnorm(_model().double())
        ddp = DDP(model)
        x1, x2 = _data()
        n = x1.shape[0] // world
        loss = ddp(x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n])
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads, "rm": model.backbone.net[1].running_mean.clone()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_on_concatenated_batch(tmp_path):
    model = _model().double()
    x1, x2 = _data()
    loss = model(x1, x2)
    loss.backward()
    ref = {k: p.grad for k, p in model.named_parameters()}
    # torch.multiprocessing's spawn machinery with the fork start method: the worker lives in this test module,
    # which a spawned interpreter cannot import under pytest's importlib mode
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
        for k, g in ref.items():
            torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-6, msg=k)
        torch.testing.assert_close(got["rm"], model.backbone.net[1].running_mean)


def test_lars_step_matches_the_official_update():
    from dinokit.methods.barlow_twins import LARS

    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5,
               weight_decay=0.1, eta=0.01)
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    g = torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([3.0, 4.0])
    q = 0.01 * 5.0 / g.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * q * g)
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # excluded: plain momentum SGD, no decay
