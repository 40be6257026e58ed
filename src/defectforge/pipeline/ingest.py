"""Stage ``ingest``: a dataset folder into the validated source manifest."""

from __future__ import annotations

import os
from pathlib import Path

from defectforge.config import DataParams
from defectforge.errors import DataError
from defectforge.manifest.validate import write_checked


def run(p: DataParams, out: str | os.PathLike, *, root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Read ``root`` (default ``data.root``) with ``data.layout`` into the source manifest ``out``."""
    from defectforge.data.adapters import ingest

    root = Path(root if root is not None else p.root)
    df = ingest(p.layout, root, image_glob=p.image_glob, mask_rule=p.mask_rule, mask_threshold=p.mask_threshold, progress=progress)
    if p.categories:
        df = df[df["category"].isin(p.categories)]
    if p.defect_types:
        df = df[df["defect_type"].isin(list(p.defect_types) + ["good"])]
    if df.empty:
        raise DataError(f"{root}: no images left after data.categories / data.defect_types filters")
    return write_checked(df, out, kind="source", dataset_root=root)
