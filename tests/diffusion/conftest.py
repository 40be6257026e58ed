"""Fixtures for the diffusion tests: tiny models built from the repo's configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_latent_dir(tmp_path_factory):
    """A test-size Stable Diffusion directory written with save_pretrained."""
    from defectforge.diffusion import build_tiny_latent_model

    return build_tiny_latent_model(tmp_path_factory.mktemp("sd-tiny") / "model")


@pytest.fixture()
def tiny():
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.unet.eval()
    return comps


class GaussianOracleUNet(nn.Module):
    """A UNet stand-in whose noise prediction is exact for Gaussian data.

    For z_0 ~ N(0, s^2 I) and z_t = sqrt(a) z_0 + sqrt(1 - a) eps the optimal predictor
    is E[eps | z_t] = sqrt(1 - a) z_t / (a s^2 + 1 - a). With it the DDIM ODE is
    smooth, so inversion followed by sampling must give back z_0 up to discretisation
    error: a test of the sampler's bookkeeping (alphas, timestep order, the masking of
    Eq. 8 and 9) that needs no trained network.
    """

    def __init__(self, alphas_cumprod, channels, in_channels, sample_size, s=0.5):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod
        self.s2 = s * s
        self.config = SimpleNamespace(out_channels=channels, in_channels=in_channels, sample_size=sample_size)

    def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None):
        z = x[:, : self.config.out_channels]
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(z)
        return SimpleNamespace(sample=(1 - a).sqrt() * z / (a * self.s2 + 1 - a))


@pytest.fixture()
def oracle(tiny):
    """Tiny components whose UNet is the Gaussian oracle (s = 0.5)."""
    cfg = tiny.unet.config
    tiny.unet = GaussianOracleUNet(tiny.scheduler.alphas_cumprod, cfg.out_channels, cfg.in_channels, cfg.sample_size)
    return tiny
