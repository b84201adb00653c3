"""The shared trainer pieces: one warm-up + cosine schedule for every caller, one parameter-group rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinokit.methods import barlow_twins, classifier, neco
from dinokit.methods.training import LARS, cosine_schedule, param_groups


def _bt(step: int, total: int, warmup: int, final: float = 0.001) -> float:
    """Barlow Twins (docs/methods/barlow_twins.md): multiplier, warm-up from 0, then q + final (1 - q)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    q = 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0), span) / span))
    return q + final * (1 - q)


def _classifier(step: int, total: int, lr: float, lr_end: float, warmup: int, start: float = 0.01) -> float:
    """The classifier recipe: warm-up from start * lr, then a cosine from lr to lr_end."""
    if warmup > 0 and step < warmup:
        return lr * (start + (1 - start) * step / warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * t))


def _neco(t: int, total: int, start: float, end: float) -> float:
    """NeCo: the plain cosine start -> end, then end."""
    return end if t >= total else end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 0), (12, 5), (1000, 1)])
def test_one_schedule_gives_every_callers_formula(total: int, warmup: int) -> None:
    for s in range(total + 5):
        assert cosine_schedule(s, total, 1.0, 0.001, warmup) == pytest.approx(_bt(s, total, warmup), rel=1e-12)
        assert cosine_schedule(s, total, 2e-4, 1e-5, warmup, 0.01) == pytest.approx(
            _classifier(s, total, 2e-4, 1e-5, warmup), rel=1e-12)
        assert cosine_schedule(s, total, 0.04, 0.5) == _neco(s, total, 0.04, 0.5)  # bit-identical
        # the public names of the methods are these settings
        assert barlow_twins.warmup_cosine(s, total, warmup) == cosine_schedule(s, total, 1.0, 0.001, warmup)
        assert classifier.cosine_lr(s, total, warmup_steps=warmup) == cosine_schedule(s, total, 2e-4, 1e-5, warmup,
                                                                                        0.01)
    assert neco.cosine_schedule is cosine_schedule


def test_schedule_endpoints_are_exact() -> None:
    assert cosine_schedule(0, 100, 3.0, 0.5) == 3.0
    assert cosine_schedule(100, 100, 3.0, 0.5) == 0.5 and cosine_schedule(250, 100, 3.0, 0.5) == 0.5  # no restart
    assert cosine_schedule(10, 100, 3.0, 0.5, warmup=10) == 3.0  # the warm-up ends at the base value
    assert cosine_schedule(0, 100, 3.0, 0.5, warmup=10) == 0.0 and cosine_schedule(5, 100, 3.0, 0.5, 10) == 1.5
    assert cosine_schedule(0, 100, 2.0, 0.0, warmup=10, warmup_start=0.01) == 0.02
    assert cosine_schedule(55, 100, 3.0, 0.5, warmup=10) == pytest.approx(1.75)  # half-way down the cosine


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.token = nn.Parameter(torch.zeros(1, 1, 4))  # cls/pos-like tokens decay
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_split_decay_and_learning_rates() -> None:
    net, head = _Net(), nn.Linear(4, 3)
    one = param_groups(net, 0.1)
    assert [g["name"] for g in one] == ["decay", "no_decay"] and all("lr" not in g for g in one)
    assert [id(p) for p in one[0]["params"]] == [id(net.token), id(net.conv.weight), id(net.fc.weight)]
    assert [id(p) for p in one[1]["params"]] == [id(net.conv.bias), id(net.bn.weight), id(net.bn.bias),
                                                 id(net.fc.bias)]
    assert (one[0]["weight_decay"], one[1]["weight_decay"]) == (0.1, 0.0)
    assert (one[0]["lars_exclude"], one[1]["lars_exclude"]) == (False, True)
    two = param_groups({"backbone": net, "head": head}, 0.04, lr={"backbone": 1e-5, "head": 1e-4})
    assert [g["name"] for g in two] == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    assert [g["lr"] for g in two] == [1e-5, 1e-5, 1e-4, 1e-4] and [g["base_lr"] for g in two] == [1e-5, 1e-5, 1e-4,
                                                                                                   1e-4]
    assert [g["decay"] for g in two] == [True, False, True, False]
    lars = param_groups(net, 1e-6, lr=0.2, no_decay_lr=0.0048)
    assert [g["lr"] for g in lars] == [0.2, 0.0048]
    # the methods' public names give the same groups
    for a, b in zip(neco.param_groups(net, head, 1e-5, 1e-4), two):
        assert a == b
    for a, b in zip(barlow_twins.param_groups(net, 1e-6, lr=0.2, bias_lr=0.0048), lars):
        assert a == b
    for a, b in zip(classifier.param_groups(net), param_groups(net, 1e-4)):
        assert a == b


def test_lars_excluded_group_is_plain_momentum_sgd() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5,
               weight_decay=0.0, eta=0.001)
    w.grad, b.grad = torch.tensor([0.0, 2.0]), torch.tensor([2.0])  # |g| = 2
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.5 * 0.001 * 5 / 2 * 2]))  # trust ratio
    torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # 1 - 0.5 * 2
