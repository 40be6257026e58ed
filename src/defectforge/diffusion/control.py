"""AdaBLDM's spatial guidance: a ControlNet on the trimap (background / object / defect).

In AdaBLDM's code (``cldm/cldm.py``, ``ControlLDM``; ``test.py``, ``generate_triple_map``)
the trimap is drawn as an image (0 background, 127 object, 255 defect) and fed to a
ControlNet whose residuals are added to the locked SD UNet's skip connections and middle
block. Here the same with diffusers' :class:`~diffusers.ControlNetModel`:

* the condition is one channel, T / 2 in {0, 0.5, 1} (T = 0 background, 1 object, 2 defect,
  :mod:`defectforge.masks.trimap`), at the crop's pixel resolution;
* the ControlNet is initialised from the UNet (``ControlNetModel.from_unet``: encoder copied,
  zero convolutions, so an untrained ControlNet changes nothing); its conditioning embedding
  downsamples by the autoencoder's factor (3 stride-2 convolutions for SD's 8, none for the
  pixel-space tiny profile) so the condition lands on the latent grid;
* the tiny UNet has no middle block, which ``from_unet`` rejects: its ControlNet gets a plain
  ``UNetMidBlock2D`` (its output passes a zero convolution, so it starts at no effect too);
* it is trained in the fine-tune stage after the UNet, with the UNet and tokens frozen
  (the reference trains it on a locked SD), and saved as ``controlnet/`` (safetensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONTROLNET_DIR = "controlnet"
EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default conditioning embedding (8x down)


def build_trimap_controlnet(unet, vae_scale_factor: int):
    """A one-channel trimap ControlNet initialised from ``unet``."""
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    emb = EMBEDDING_CHANNELS[: int(round(math.log2(vae_scale_factor))) + 1]
    if unet.config.mid_block_type is not None:
        return ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=emb)

    class _Proxy:  # the UNet's config with a middle block ControlNetModel accepts; weights copied below
        config = FrozenDict({**unet.config, "mid_block_type": "UNetMidBlock2D"})

    cn = ControlNetModel.from_unet(_Proxy(), conditioning_channels=1, conditioning_embedding_out_channels=emb,
                                   load_weights_from_unet=False)
    for name in ("conv_in", "time_proj", "time_embedding", "down_blocks"):
        getattr(cn, name).load_state_dict(getattr(unet, name).state_dict())
    cn = cn.to(unet.device)
    # cast only when needed: ModelMixin.to(dtype) warns about fp32 modules even when it has none
    return cn if cn.dtype == unet.dtype else cn.to(dtype=unet.dtype)


def trimap_condition(trimap: torch.Tensor, size: int) -> torch.Tensor:
    """Trimap (B, 1, H, W) with values {0, 1, 2} -> the ControlNet's condition T / 2 at ``size`` px (nearest)."""
    t = trimap.float()
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode="nearest")
    return t / 2


def control_residuals(controlnet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor):
    """(down residuals, mid residual) of ``controlnet`` for the UNet input ``x``."""
    if cond.shape[0] != x.shape[0]:
        cond = cond.expand(x.shape[0], -1, -1, -1)
    down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=cond.to(x.dtype), return_dict=False)
    return down, mid
