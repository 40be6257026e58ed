"""Stage ``split``: train / test (and folds) for every source row, seeded."""

from __future__ import annotations

import os
from pathlib import Path

from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.manifest.validate import write_checked
from defectforge.params.split import SplitParams


def run(p: SplitParams, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Assign train/test (and folds) to the source rows; writes the split manifest ``out``."""
    from defectforge.data.split import split_sources

    info = manifest_info(source)
    df = read_manifest(source).to_pandas()
    out_df = split_sources(df, scheme=p.scheme, k=p.k, fold=p.fold, seed=p.seed, good_test_fraction=p.good_test_fraction)
    return write_checked(out_df, out, kind="split", dataset_root=info["dataset_root"])
