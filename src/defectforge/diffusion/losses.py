"""The disentangled training loss of the DDIM-inversion paper (Eq. 5-7).

Notation (../shared/seeds/ddim-inversion-disentangled-background.txt, Sec. 3.1):

    m              defect mask (1 inside), at latent resolution
    z_0^m          (1 - m) * z_0, the masked latent
    C_1, C_2       [C_def, C_bg] and [C_m, C_bg]

    z_t   = sqrt(alpha_t) z_0   + sqrt(1 - alpha_t) eps                      (6)
    z_t^m = sqrt(alpha_t) z_0^m + sqrt(1 - alpha_t) (1 - m) * eps            (7)

    L = || m * (eps - eps_theta(z_t, t, C_1)) ||^2            matching loss
      + || (1 - m) * (eps - eps_theta(z_t^m, t, C_2)) ||^2    regulariser     (5)

Squared norms are averaged over elements (sum / numel), so the loss scale does not
depend on the image size.
"""

from __future__ import annotations

import torch


def masked_noising(z0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6) and (7). ``alpha``: (B, 1, 1, 1) cumulative alphas. Returns (z_t, z_t^m)."""
    a = alpha.sqrt()
    s = (1 - alpha).sqrt()
    z_t = a * z0 + s * eps  # (6)
    z_t_m = a * ((1 - mask) * z0) + s * ((1 - mask) * eps)  # (7)
    return z_t, z_t_m


def disentangled_loss(eps: torch.Tensor, eps_def: torch.Tensor, eps_bg: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. (5): ``eps_def`` = eps_theta(z_t, t, C_1), ``eps_bg`` = eps_theta(z_t^m, t, C_2).

    Returns ``{"loss", "matching", "regulariser"}`` (loss = matching + regulariser).
    """
    matching = (mask * (eps - eps_def)).pow(2).mean()
    regulariser = ((1 - mask) * (eps - eps_bg)).pow(2).mean()
    return {"loss": matching + regulariser, "matching": matching, "regulariser": regulariser}
