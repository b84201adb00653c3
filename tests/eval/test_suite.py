"""dense_eval_suite: oracle features score 1 everywhere; noise scores much lower."""

import torch

from dinokit.eval import dense_eval_suite

from ._synthetic import noisy_oracle, stripes


def test_suite_oracle_and_noise():
    cells, masks = stripes(12, seed=0)
    vcells, vmasks = stripes(6, seed=1)
    o = dense_eval_suite(noisy_oracle(cells, 4, 0), masks, noisy_oracle(vcells, 4, 0), vmasks, 4, quick=True,
                         linear_lrs=(1.0,))
    assert o["overcluster/k4/miou"] == 1.0 and o["overcluster/k12/miou"] == 1.0
    assert o["linear/miou"] == 1.0 and o["hummingbird/miou"] == 1.0
    g = torch.Generator().manual_seed(0)
    n = dense_eval_suite(torch.randn(12, 6, 6, 16, generator=g), masks, torch.randn(6, 6, 6, 16, generator=g), vmasks,
                         4, quick=True, position=True, linear_lrs=(1.0,))
    assert n["hummingbird/miou"] < 0.5 and n["overcluster/k4/miou"] < 0.5 and "position/r2" in n
