"""Datasets in: layout adapters, the built-in sample, the split, the image codec (``codec``) and the
files and folders written (``files``: hashes, atomic writes, owned folders)."""
