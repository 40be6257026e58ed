"""DefectDiffu's configuration, the ``generate.defectdiffu`` section of params.yaml: a module of its
own, so the sampler and the method share it without importing each other."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from defectforge.methods.config import DiffusionConfig


class DefectDiffuConfig(DiffusionConfig):
    """DefectDiffu: double-free guidance (Eq. 4) inside the target mask, mask from the
    defect tokens' cross-attention averaged over the last steps, binarised by an iterative threshold."""

    section: ClassVar[str] = "defectdiffu"
    w_p: float = Field(1.0, ge=0, le=20)                    # Eq. 4: product (background) perturbation scale
    w_d: float = Field(2.0, ge=0, le=20)                    # Eq. 4: defect perturbation scale (defect strength)
    attention_fraction: float = Field(0.1, gt=0, le=1)      # last share of steps averaged for the mask (paper: last 100 of 1000)
    mask_source: Literal["attention", "module", "target"] = "attention"  # result.mask: binarised attention share | the mask
                                                            # generation module's M_pre (paper, Eq. 6; finetune.mask_module > 0) | the target
    threshold: Literal["iterative", "fixed"] = "iterative"  # iterative (Ridler-Calvard) threshold, or threshold_value
    threshold_value: float = Field(0.5, ge=0, le=1)         # the fixed threshold (threshold: fixed)
    threshold_tol: float = Field(1e-4, gt=0, le=0.1)        # convergence of the iterative threshold
