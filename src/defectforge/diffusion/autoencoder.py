"""An identity autoencoder behind AutoencoderKL's encode/decode interface.

The tiny profile runs in pixel space: a tiny VAE at 64 px costs more than the UNet
and shrinks a 13-px pit to 3 latent pixels. Keeping the AutoencoderKL
interface (``encode(x).latent_dist``, ``decode(z).sample``, ``config.scaling_factor``)
lets every method use one code path for both profiles; methods check
:attr:`has_decoder` to know that there is no decoder to adapt (AdaBLDM's stage 4).

    >>> import torch
    >>> ae = IdentityAutoencoder()
    >>> x = torch.zeros(1, 3, 8, 8)
    >>> bool((ae.decode(ae.encode(x).latent_dist.mode()).sample == x).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _IdentityConfig:
    scaling_factor: float = 1.0
    latent_channels: int = 3
    block_out_channels: tuple[int, ...] = (3,)  # one level: vae_scale_factor = 2 ** 0 = 1


class _Dist:
    """Stands in for DiagonalGaussianDistribution: a point mass at the input."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def mode(self) -> torch.Tensor:
        return self.x

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.x


@dataclass
class _EncoderOutput:
    latent_dist: _Dist


@dataclass
class _DecoderOutput:
    sample: torch.Tensor


class IdentityAutoencoder(nn.Module):
    """z = x: encode/decode are the identity; no parameters, nothing to adapt."""

    has_decoder = False

    def __init__(self, channels: int = 3):
        super().__init__()
        self.config = _IdentityConfig(latent_channels=channels)

    def encode(self, x: torch.Tensor) -> _EncoderOutput:
        return _EncoderOutput(_Dist(x))

    def decode(self, z: torch.Tensor) -> _DecoderOutput:
        return _DecoderOutput(z)
