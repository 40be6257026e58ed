"""The ``split`` section: how the real images are split (read by the split stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectforge.params.loader import Section


class SplitParams(Section):
    """AnomalyDiffusion's lowest-third rule or the DDIM-inversion paper's k-fold."""

    scheme: Literal["third", "kfold"] = "third"
    k: int = Field(2, ge=2, le=10)
    fold: int = Field(0, ge=0)
    seed: int = 0
    good_test_fraction: float = Field(0.3, gt=0.0, lt=1.0)

    def check(self, key: str) -> str | None:
        if self.scheme == "kfold" and self.fold >= self.k:
            return f"{key}.fold: {self.fold} must be < {key}.k ({self.k})"
        return None
