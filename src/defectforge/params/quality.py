"""The ``quality`` section: image-quality metrics and gates (read by the quality stage)."""

from __future__ import annotations

from pydantic import Field

from defectforge.params.loader import Section


class QualityParams(Section):
    """Image-quality metrics per (category, defect type, method) and the gates."""

    backbone: str = "random-vgg11-seed0"
    weights: str | None = None
    lpips_backbone: str = "random-alexnet-seed0"
    lpips_weights: str | None = None
    size: int = Field(64, ge=16, le=512)
    crop_context: float = Field(2.0, ge=1.0, le=10.0)
    c2st_folds: int = Field(5, ge=2, le=20)      # classifier two-sample test: stratified k-fold
    c2st_size: int = Field(32, ge=8, le=256)     # crops resized to this for the two-sample test
    c2st_repeats: int = Field(10, ge=1, le=1000)  # repeated k-fold (fresh subsample and folds each time), accuracy = their mean
    seed: int = 0                                # seeds the two-sample test's folds and real-vs-real halves
    gates: dict[str, float | int] = {}
    set_gates: dict[str, float | None] = {"min_pass_rate": 0.5}

    def check(self, key: str) -> str | None:
        from defectforge.errors import ParamsError
        from defectforge.metrics.gates import GateThresholds, SetThresholds, thresholds_from_dict

        for name, cls in (("gates", GateThresholds), ("set_gates", SetThresholds)):
            try:
                thresholds_from_dict(getattr(self, name), cls)
            except ParamsError as exc:
                return f"{key}.{name}: {exc}"
        return None
