"""DefectDiffu: Few-shot Defect Image Generation based on Consistency Modeling. Seed:
../shared/seeds/defectdiffu-consistency-modeling.txt.

==============  =========================================================================
module          what
==============  =========================================================================
``training``    the fine-tune's parts as training hooks: Algorithm 1 (condition dropout),
                TDIA (Sec. 3.2), AAL (Eq. 7-10), the mask module's loss (Eq. 6, 11)
``sampler``     double-free guidance (Eq. 4), zero-shot (Eq. 12), the iterative threshold
``method``      :class:`DefectDiffu`, the generation method (registry id ``defectdiffu``)
==============  =========================================================================

This file imports nothing but the lazy-export helper, so one part's code does not depend on the others'; names are
importable from here and load their module on first use.
"""

from __future__ import annotations

from defectforge.methods.lazy import lazy_exports

_EXPORTS = {
    "DefectDiffuConfig": "config",
    "DefectDiffu": "method",
    "CONDITIONS": "sampler",
    "DEFECT_ROW": "sampler",
    "DoubleFreeRow": "sampler",
    "attention_mask": "sampler",
    "contexts": "sampler",
    "iterative_threshold": "sampler",
    "sample_double_free": "sampler",
    "sample_double_free_batch": "sampler",
    "AdaptiveAttention": "training",
    "DoubleFreeDropout": "training",
    "MaskModuleLoss": "training",
    "TDIA": "training",
    "adaptive_attention_loss": "training",
    "defectdiffu_hooks": "training",
    "double_free_dropout": "training",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
