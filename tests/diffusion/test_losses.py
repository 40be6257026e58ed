"""Eq. 5 (disentangled loss) and Eq. 6-7 (masked noising)."""

from __future__ import annotations

import torch

from defectforge.diffusion import disentangled_loss, masked_noising


def _setup():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    m = torch.zeros(2, 1, 8, 8)
    m[..., 2:5, 3:6] = 1
    return g, eps, m


def test_loss_is_zero_when_predictions_equal_the_noise():
    _, eps, m = _setup()
    out = disentangled_loss(eps, eps.clone(), eps.clone(), m)
    assert out["loss"].item() == 0 and out["matching"].item() == 0 and out["regulariser"].item() == 0


def test_each_term_reacts_only_to_its_own_region_and_branch():
    g, eps, m = _setup()
    bump = torch.randn(eps.shape, generator=g)
    # defect-branch error inside the mask -> matching only
    a = disentangled_loss(eps, eps + m * bump, eps, m)
    assert a["matching"] > 0 and a["regulariser"] == 0
    # defect-branch error outside the mask is not penalised (the background branch owns it)
    b = disentangled_loss(eps, eps + (1 - m) * bump, eps, m)
    assert b["loss"] == 0
    # background-branch error outside the mask -> regulariser only
    c = disentangled_loss(eps, eps, eps + (1 - m) * bump, m)
    assert c["regulariser"] > 0 and c["matching"] == 0
    # background-branch error inside the mask is not penalised
    d = disentangled_loss(eps, eps, eps + m * bump, m)
    assert d["loss"] == 0
    # both errors: the terms add up (Eq. 5's combined form)
    e = disentangled_loss(eps, eps + m * bump, eps + (1 - m) * bump, m)
    torch.testing.assert_close(e["loss"], a["matching"] + c["regulariser"])
    combined = (eps - m * (eps + m * bump) - (1 - m) * (eps + (1 - m) * bump)).pow(2).mean()
    torch.testing.assert_close(e["loss"], combined)


def test_masked_noising_background_identity():
    """(1 - m) * z_t = z_t^m for every t, and z_t^m is zero inside the mask (Eq. 6-7)."""
    g, eps, m = _setup()
    z0 = torch.randn(eps.shape, generator=g)
    alpha = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1)
    z_t, z_t_m = masked_noising(z0, eps, m, alpha)
    torch.testing.assert_close((1 - m) * z_t, z_t_m)
    assert (z_t_m * m).abs().max() == 0
    torch.testing.assert_close(z_t, alpha.sqrt() * z0 + (1 - alpha).sqrt() * eps)
