"""defectforge: a data factory for synthetic industrial defect images.

The consumer side is what this top level exports, and it imports with pyarrow, pillow and
numpy only (torch when a :class:`ManifestDataset` item is read)::

    import defectforge
    table = defectforge.load(name="sample", version=1)          # a published version
    ds = defectforge.ManifestDataset(table)                      # (image, mask, row)

Both live in :mod:`defectforge.publish.consume`; the factory (the DAG's stages, methods,
metrics, publishing) is the rest of the package and needs ``pip install defectforge[factory]``.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See :func:`defectforge.publish.consume.load`."""
    from defectforge.publish.consume import load as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    if name == "ManifestDataset":
        from defectforge.publish.consume import ManifestDataset

        return ManifestDataset
    raise AttributeError(name)
