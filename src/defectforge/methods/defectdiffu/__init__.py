"""DefectDiffu: Few-shot Defect Image Generation based on Consistency Modeling. Seed:
../shared/seeds/defectdiffu-consistency-modeling.txt.

==============  =========================================================================
module          what
==============  =========================================================================
``training``    the fine-tune's parts as training hooks: Algorithm 1 (condition dropout),
                TDIA (Sec. 3.2), AAL (Eq. 7-10), the mask module's loss (Eq. 6, 11)
``attention``   TDIA's attention processor and split (Sec. 3.2); how a fine-tune's TDIA and
                mask module load
``mask_module`` the mask generation module G and its loss (Eq. 6, 11)
``sampler``     double-free guidance (Eq. 4), zero-shot (Eq. 12), the iterative threshold
``method``      :class:`DefectDiffu`, the generation method (registry id ``defectdiffu``)
==============  =========================================================================

This file imports nothing but the lazy-export helper, so one part's code does not depend on the others'; names are
importable from here and load their module on first use.
"""

from __future__ import annotations

from defectforge.methods.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "attention": ("TDIAAttnProcessor", "TDIA_PARTS", "TOKEN_KIND", "install_tdia", "mask_module_layers", "set_tdia",
                  "tdia_parts", "uses_tdia"),
    "config": ("DefectDiffuConfig",),
    "mask_module": ("MASK_MODULE_DIR", "MaskGenerationModule", "mask_features", "mask_loss", "module_input", "predicted_mask"),
    "method": ("DefectDiffu",),
    "sampler": ("CONDITIONS", "DEFECT_ROW", "DoubleFreeRow", "attention_mask", "contexts",
                "iterative_threshold", "sample_double_free", "sample_double_free_batch"),
    "training": ("AdaptiveAttention", "DoubleFreeDropout", "MaskModuleLoss", "TDIA",
                 "adaptive_attention_loss", "defectdiffu_hooks", "double_free_dropout"),
})
