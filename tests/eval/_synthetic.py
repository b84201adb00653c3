"""Tensor fixtures shared by the evaluator tests: stripe label maps and oracle / noisy features."""

import torch
import torch.nn.functional as F


def stripes(n: int, h: int = 6, w: int = 6, c: int = 4, p: int = 4, seed: int = 0):
    """Cell labels constant on whole rows: returns (cells (n, h, w), pixel masks (n, h·p, w·p))."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, c, (n, h, 1), generator=g).expand(n, h, w)
    return rows, rows.repeat_interleave(p, 1).repeat_interleave(p, 2)


def noisy_oracle(cells: torch.Tensor, c: int, sigma: float, d: int = 16, seed: int = 0) -> torch.Tensor:
    """One-hot ground truth per patch in the first c of d dims plus N(0, sigma²) noise: (n, h, w, d)."""
    g = torch.Generator().manual_seed(seed)
    onehot = F.pad(F.one_hot(cells, c).float(), (0, d - c))
    return onehot + sigma * torch.randn(onehot.shape, generator=g)
