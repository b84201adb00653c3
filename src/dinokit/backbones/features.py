"""The dense contracts every consumer uses: DenseFeatures, AttentionMaps, Facets."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DenseFeatures:
    """Dense output of one block.

    patch: (B, h, w, D) patch tokens (after the final norm when ``normalized``), row-major;
    cls: (B, D) or None (ResNet); registers: (B, R, D), R may be 0; grid: (h, w);
    patch_size: pixels per token side; layer: non-negative block index; image_size: (H, W) fed;
    valid: (h, w) bool mask of patches holding at least one original pixel (size policy ``pad``) or None.
    """

    patch: torch.Tensor
    cls: torch.Tensor | None
    registers: torch.Tensor
    grid: tuple[int, int]
    patch_size: int
    layer: int
    normalized: bool = True
    image_size: tuple[int, int] | None = None
    valid: torch.Tensor | None = None

    def flat(self) -> torch.Tensor:
        """(B, h*w, D) patch tokens."""
        return self.patch.flatten(1, 2)

    def nchw(self) -> torch.Tensor:
        """(B, D, h, w) patch tokens."""
        return self.patch.permute(0, 3, 1, 2)

    def pooled(self) -> torch.Tensor:
        """(B, D): the CLS token, else the mean of patch tokens (registers never included)."""
        return self.cls if self.cls is not None else self.patch.mean(dim=(1, 2))

    def to(self, *args, **kwargs) -> DenseFeatures:
        """Move/cast every tensor (like ``Tensor.to``); ``valid`` only moves device."""
        patch = self.patch.to(*args, **kwargs)
        return DenseFeatures(patch, None if self.cls is None else self.cls.to(*args, **kwargs),
                             self.registers.to(*args, **kwargs), self.grid, self.patch_size, self.layer,
                             self.normalized, self.image_size,
                             None if self.valid is None else self.valid.to(patch.device))


@dataclass
class AttentionMaps:
    """CLS-query attention of one block.

    cls: (B, heads, h, w) float32 raw softmax probabilities of the CLS query over patch keys (sum <= 1);
    prefix: (B, heads, P) mass on [CLS, registers]; full: (B, heads, N, N) or None; block: index; grid: (h, w).
    """

    cls: torch.Tensor
    prefix: torch.Tensor
    block: int
    grid: tuple[int, int]
    full: torch.Tensor | None = None

    def renormalized(self) -> torch.Tensor:
        """(B, heads, h, w): ``cls`` divided per head by its sum over patches (a distribution)."""
        s = self.cls.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(self.cls.dtype).tiny)
        return self.cls / s

    def mean(self) -> torch.Tensor:
        """(B, h, w) head-averaged renormalised map."""
        return self.renormalized().mean(1)


class Facets(dict):
    """q/k/v facets of a block: ``q``, ``k``, ``v`` (B, heads, N, d_h) in token order [CLS, registers,
    patches] and ``tokens`` (B, N, D), the block's output residual stream."""

    def __init__(self, *args, grid: tuple[int, int], num_prefix_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens

    def patches(self, name: str) -> torch.Tensor:
        """(B, h, w, heads*d_h): patch rows of facet ``name`` with heads concatenated in head order."""
        t = self[name][:, :, self.num_prefix_tokens:]
        b, nh, n, d = t.shape
        return t.permute(0, 2, 1, 3).reshape(b, *self.grid, nh * d)

    def cls(self, name: str) -> torch.Tensor:
        """(B, heads*d_h): the CLS row of facet ``name``."""
        t = self[name][:, :, 0]
        return t.flatten(1)
