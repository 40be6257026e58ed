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

This file imports nothing but the lazy-export helper: a module that needs one part (the generate stage reads the Eq. 9
mask model for any method's target masks) does not depend on the others' code. Names are
importable from here and load their module on first use.
"""

from __future__ import annotations

from defectforge.methods.lazy import lazy_exports

_EXPORTS = {
    "AnomalyDiffusionConfig": "config",
    "AnomalyDiffusion": "method",
    "ADRow": "sampler",
    "sample_anomalydiffusion": "sampler",
    "sample_anomalydiffusion_batch": "sampler",
    "SpatialEncoder": "embedding",
    "spatial_anomaly_embedding": "embedding",
    "masked_diffusion_loss": "training",
    "train_anomaly_embedding": "training",
    "save_anomaly_embedding": "embedding",
    "fit_anomaly_embedding": "training",
    "load_anomaly_embedding": "embedding",
    "EMBEDDING_DIR": "embedding",
    "EMBEDDING_WEIGHTS": "embedding",
    "EMBEDDING_META": "embedding",
    "FORMAT": "embedding",
    "AttentionReweight": "attention",
    "ReweightedAttnProcessor": "attention",
    "adaptive_weight_map": "attention",
    "dilate_mask": "attention",
    "install_reweighting": "attention",
    "reweight_dilation_radius": "attention",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
