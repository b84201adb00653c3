"""Datasets, the synthetic benchmark, transforms and crops."""
