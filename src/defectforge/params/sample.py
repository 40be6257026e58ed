"""The ``sample`` section: the built-in sample dataset (read by the sample stage)."""

from __future__ import annotations

from pydantic import Field

from defectforge.params.loader import Section


class SampleParams(Section):
    """The built-in sample (MVTec AD layout, made deterministically)."""

    seed: int = 0
    size: int = Field(128, ge=32, le=1024)
    n_train_good: int = Field(24, ge=2)
    n_test_good: int = Field(8, ge=1)
    n_defect: int = Field(12, ge=3)
