"""Stage ``sample``: the built-in sample dataset (MVTec AD layout, made deterministically)."""

from __future__ import annotations

import os
from pathlib import Path

from defectforge.params.sample import SampleParams


def run(p: SampleParams, out_dir: str | os.PathLike) -> Path:
    """Make the built-in sample dataset in ``out_dir`` (reused when it already matches ``p``)."""
    from defectforge.data.sample import make_sample

    return make_sample(out_dir, seed=p.seed, size=p.size, n_train_good=p.n_train_good, n_test_good=p.n_test_good, n_defect=p.n_defect)
