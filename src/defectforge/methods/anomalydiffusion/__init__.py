"""AnomalyDiffusion: Few-Shot Anomaly Image Generation with Diffusion Model (Hu et al.,
AAAI 2024; code: github.com/sjtuplayer/anomalydiffusion). Seed:
../shared/seeds/anomalydiffusion-few-shot.txt.

The paper, part by part:

=================  =====================================================================
module             what
=================  =====================================================================
``embedding``      spatial anomaly embedding e = {e_a, E(m)}: the encoder E and its files
``training``       masked textual inversion of e_a and E (Eq. 5-6)
``attention``      adaptive attention re-weighting (Eq. 7-8) and its attention processor
``sampler``        blended diffusion with e and the re-weighting in every step (Eq. 1)
``mask_model``     mask generation (Eq. 9): the mask model, its sampling and files
``mask_training``  its training (textual inversion of a mask embedding, or a small UNet)
``method``         :class:`AnomalyDiffusion`, the generation method (registry id
                   ``anomalydiffusion``)
=================  =====================================================================

This file imports nothing but the lazy-export helper: a module that needs one part (the
generate stage reads the Eq. 9 mask model for any method's target masks) does not depend on
the others' code. Names are importable from here and load their module on first use.
"""

from __future__ import annotations

from defectforge.methods.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("AnomalyDiffusionConfig",),
    "method": ("AnomalyDiffusion",),
    "sampler": ("ADRow", "sample_anomalydiffusion", "sample_anomalydiffusion_batch"),
    "embedding": ("SpatialEncoder", "spatial_anomaly_embedding", "save_anomaly_embedding",
                  "load_anomaly_embedding", "EMBEDDING_DIR", "EMBEDDING_WEIGHTS", "EMBEDDING_META", "FORMAT"),
    "training": ("masked_diffusion_loss", "train_anomaly_embedding", "fit_anomaly_embedding"),
    "attention": ("AttentionReweight", "ReweightedAttnProcessor", "adaptive_weight_map", "dilate_mask",
                  "install_reweighting", "reweight_dilation_radius"),
})
