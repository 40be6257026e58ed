"""Diffusion core: model loading (tiny and pretrained profiles), prompt tokens,
masked cross-attention processors, DDIM updates, the disentangled loss and the
training loops.

    from defectforge.diffusion import load_pipeline_components, pretrain, finetune
"""

from defectforge.diffusion.attention import AttentionStore, MaskedCrossAttnProcessor, install_masked_attention
from defectforge.diffusion.autoencoder import IdentityAutoencoder
from defectforge.diffusion.ddim import add_noise, ddim_schedule, ddim_step, guided, predict_x0
from defectforge.diffusion.losses import disentangled_loss, masked_noising
from defectforge.diffusion.models import (
    DiffusionComponents,
    build_tiny_components,
    build_tiny_latent_model,
    load_pipeline_components,
    save_tiny,
)
from defectforge.diffusion.training import CURVE_FILE, finetune, pretrain

__all__ = [
    "AttentionStore",
    "CURVE_FILE",
    "DiffusionComponents",
    "IdentityAutoencoder",
    "MaskedCrossAttnProcessor",
    "add_noise",
    "build_tiny_components",
    "build_tiny_latent_model",
    "ddim_schedule",
    "ddim_step",
    "disentangled_loss",
    "finetune",
    "guided",
    "install_masked_attention",
    "load_pipeline_components",
    "masked_noising",
    "predict_x0",
    "pretrain",
    "save_tiny",
]
