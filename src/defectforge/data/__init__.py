"""Datasets in: layout adapters, the built-in sample, image io and the split."""
