"""The ``finetune`` section: per-defect-type training (read by the finetune stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectforge.params.loader import Section


class FinetuneParams(Section):
    """Per defect type: the DDIM-inversion paper's disentangled training (Eq. 5-7, 10-11)."""

    mode: Literal["unet", "lora"] = "unet"
    steps: int = Field(150, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float | None = Field(None, gt=0, le=1)
    token_lr: float = Field(5e-3, gt=0, le=1)
    lora_rank: int = Field(4, ge=1, le=256)
    prior_fraction: float = Field(0.5, ge=0, lt=1)
    loss_norm: Literal["all", "area"] = "all"  # Eq. 5 norms: mean over all pixels | over the mask / background pixels
    attention_loss: float = Field(0.0, ge=0, le=100)  # weight of the attention loss (joint defect share -> m', for Eq. 13)
    attention_rows: Literal["defect", "defect+mask"] = "defect"  # C_1 defect rows only, or also the C_2 rows
    # DefectDiffu Algorithm 1 (double-free condition dropout): p_1 = product condition -> null, p_2 = defect -> good
    cond_dropout_product: float = Field(0.0, ge=0, lt=1)  # p_1 (paper: 0.2); > 0 also learns the null tokens Eq. 4 needs
    cond_dropout_defect: float = Field(0.0, ge=0, lt=1)   # p_2 (paper: 0.2)
    aal: bool = False                                     # DefectDiffu's adaptive attention-enhanced loss (Eq. 7-10)
    aal_alpha: float = Field(1e-3, gt=0, le=1)            # alpha of Eq. 8 (paper: 0.001)
    tdia: bool = False                                    # DefectDiffu's TDIA: background / defect / fusion parts, each its own prompt
    mask_module: float = Field(0.0, ge=0, le=100)         # lambda of Eq. 11: > 0 trains DefectDiffu's mask generation module (Eq. 6)
    mask_module_lr: float = Field(1e-3, gt=0, le=1)       # its learning rate (it starts from scratch)
    # AdaBLDM's spatial guidance: a trimap ControlNet trained after the UNet (UNet frozen), used by method blended
    trimap_control: bool = False
    trimap_control_steps: int = Field(0, ge=0, le=1_000_000)  # its training steps (0: finetune.steps)
    # AnomalyDiffusion masked textual inversion (Eq. 5-6) on the frozen base: anomaly tokens e_a + spatial encoder E
    anomaly_embedding: bool = False                       # also train e_a and E per defect type (method anomalydiffusion)
    anomaly_tokens: int = Field(4, ge=1, le=64)           # k, tokens of the anomaly embedding e_a
    spatial_tokens: int = Field(4, ge=1, le=64)           # n, tokens of the spatial embedding e_s = E(m)
    anomaly_steps: int = Field(200, ge=1, le=1_000_000)   # optimisation steps of Eq. 6
    anomaly_lr: float = Field(5e-3, gt=0, le=1)           # Adam learning rate of e_a and E
    # AnomalyDiffusion mask generation (Eq. 9), per defect type, for generate.target_placement: generated
    mask_model: Literal["none", "diffusion", "textual-inversion"] = "none"  # diffusion: a small mask UNet (tiny profile)
    mask_model_steps: int = Field(1500, ge=1, le=1_000_000)
    mask_model_resolution: int = Field(64, ge=8, le=1024)  # whole-image masks squashed to R x R (diffusion kind)
    mask_tokens: int = Field(4, ge=1, le=64)              # k', tokens of the mask embedding e_m (textual-inversion kind)
    mask_model_flip: bool = True                          # left-right / up-down flips of the few real masks
    mask_model_downsample: Literal["cover", "area"] = "cover"  # cover: a pixel is defect when any pixel under it is
    # memory (docs/gpu-memory-plan.md): autocast precision (weights, gradients and AdamW states stay fp32; fp16 needs
    # CUDA), activation checkpointing, 8-bit AdamW (bitsandbytes, optional)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=64)                  # processes fine-tuning defect types side by side (same bytes as 1)
