"""defectforge: a data factory for synthetic industrial defect images.

    import defectforge
    table = defectforge.load(name="sample", version=1)          # a published version
    ds = defectforge.ManifestDataset(table)                      # (image, mask, row)
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See :func:`defectforge.consume.load`."""
    from defectforge.publish.consume import load as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    if name == "ManifestDataset":
        from defectforge.publish.consume import ManifestDataset

        return ManifestDataset
    raise AttributeError(name)
