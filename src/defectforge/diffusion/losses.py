"""The disentangled training loss of the DDIM-inversion paper (Eq. 5-7).

Notation (../shared/seeds/ddim-inversion-disentangled-background.txt, Sec. 3.1):

    m              defect mask (1 inside), at latent resolution
    z_0^m          (1 - m) * z_0, the masked latent
    C_1, C_2       [C_def, C_bg] and [C_m, C_bg]

    z_t   = sqrt(alpha_t) z_0   + sqrt(1 - alpha_t) eps                      (6)
    z_t^m = sqrt(alpha_t) z_0^m + sqrt(1 - alpha_t) (1 - m) * eps            (7)

    L = || m * (eps - eps_theta(z_t, t, C_1)) ||^2            matching loss
      + || (1 - m) * (eps - eps_theta(z_t^m, t, C_2)) ||^2    regulariser     (5)

How the squared norms are normalised (``norm``). The paper writes plain squared norms,
i.e. every latent element has weight 1 in both terms, so the matching term's share of
the loss grows with the mask's area. With a B x C x H x W batch and |m| the number of
mask pixels of a sample:

* ``"all"`` (default, the paper's weighting up to a constant): both terms are divided
  by the number of elements B*C*H*W. Per-pixel weight 1/(B C H W) inside and outside
  the mask, so a 2 % mask gives the matching term about 2 % of the weight: the defect
  is barely trained (DefectDiffu, Sec. 3.5, names the same problem).
* ``"area"``: per sample, the matching term is the mean over the mask's elements,
  sum(m * err^2) / (C |m|), and the regulariser the mean over the background's
  elements, sum((1-m) * err^2) / (C |1-m|); then the mean over the batch. Per-pixel
  weight 1/(B C |m|) inside and 1/(B C |1-m|) outside, so both terms weigh the same
  whatever the mask's size. A sample whose mask (or background) is empty contributes
  0 to that term. Eq. 5's combined form ||eps - m eps_1 - (1-m) eps_2||^2 holds only for
  ``"all"``.
"""

from __future__ import annotations

import torch

NORMS = ("all", "area")


def masked_noising(z0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (6) and (7). ``alpha``: (B, 1, 1, 1) cumulative alphas. Returns (z_t, z_t^m)."""
    a = alpha.sqrt()
    s = (1 - alpha).sqrt()
    z_t = a * z0 + s * eps  # (6)
    z_t_m = a * ((1 - mask) * z0) + s * ((1 - mask) * eps)  # (7)
    return z_t, z_t_m


def _region_mean(sq_err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per sample sum(w * e^2) / (C * sum(w)), then the batch mean ("area" norm)."""
    c = sq_err.shape[1]
    num = (weight * sq_err).flatten(1).sum(1)
    den = weight.flatten(1).sum(1) * c
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).mean()


def disentangled_loss(
    eps: torch.Tensor, eps_def: torch.Tensor, eps_bg: torch.Tensor, mask: torch.Tensor, norm: str = "all"
) -> dict[str, torch.Tensor]:
    """Eq. (5): ``eps_def`` = eps_theta(z_t, t, C_1), ``eps_bg`` = eps_theta(z_t^m, t, C_2).

    ``norm``: "all" or "area" (see the module docstring). Returns ``{"loss",
    "matching", "regulariser"}`` (loss = matching + regulariser).
    """
    if norm == "all":
        matching = (mask * (eps - eps_def)).pow(2).mean()
        regulariser = ((1 - mask) * (eps - eps_bg)).pow(2).mean()
    elif norm == "area":
        matching = _region_mean((eps - eps_def).pow(2), mask)
        regulariser = _region_mean((eps - eps_bg).pow(2), 1 - mask)
    else:
        raise ValueError(f"disentangled_loss: norm must be one of {NORMS}, got {norm!r}")
    return {"loss": matching + regulariser, "matching": matching, "regulariser": regulariser}
