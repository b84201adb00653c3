"""Figures: PCA maps, attention overlays, masks, effective receptive fields (and the Lightning callbacks that log
them: ``dinokit.viz.callbacks``)."""

from .erf import effective_receptive_field, plot_erf
from .figures import save_grid
from .maps import mass_threshold_mask, pca_rgb, upsample_map

__all__ = ["effective_receptive_field", "mass_threshold_mask", "pca_rgb", "plot_erf", "save_grid", "upsample_map"]
