"""AnomalyDiffusion's configuration, the ``generate.anomalydiffusion`` section of params.yaml: a module of its
own, so the sampler and the method share it without importing each other."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from defectforge.methods.config import DiffusionConfig


class AnomalyDiffusionConfig(DiffusionConfig):
    """AnomalyDiffusion: blended diffusion (Eq. 1) conditioned on the spatial anomaly embedding
    e = {e_a, E(m)} (trained by finetune.anomaly_embedding), with adaptive attention re-weighting (Eq. 7-8)."""

    section: ClassVar[str] = "anomalydiffusion"
    reweight: bool = True                                   # adaptive attention re-weighting (Eq. 7-8); False: the w/o-AAR ablation
    reweight_max: float = Field(1.5, ge=1, le=10)           # upper clamp of w_m (the authors' code: 1.5; weights lie in [1, max])
    reweight_dilation: float = Field(8.0, ge=0, le=64)      # mask dilation r(t) = (t + 100) * this / 1000 px on a 32-px latent (authors: 8)
