"""The ``refine`` section: mask refinement (read by the refine stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectforge.params.loader import Section


class RefineParams(Section):
    """Mask refinement from the defect tokens' cross-attention (DDIM-inversion Eq. 13)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    radius: int = Field(1, ge=0, le=10)
    min_area_ratio: float = Field(0.1, ge=0.0, le=1.0)
    fallback: Literal["difference", "raw"] = "difference"
    difference_fraction: float = Field(0.5, gt=0.0, lt=1.0)
