"""Figures: PCA maps, attention overlays, masks (and the Lightning callbacks that log them)."""

from .maps import mass_threshold_mask, pca_rgb, save_grid, upsample_map

__all__ = ["mass_threshold_mask", "pca_rgb", "save_grid", "upsample_map"]
