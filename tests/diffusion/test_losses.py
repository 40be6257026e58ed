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


def test_area_norm_by_hand():
    """loss_norm "area": per sample sum(m e^2) / (C |m|) and sum((1-m) e^2) / (C |1-m|), then the batch mean."""
    eps = torch.zeros(2, 2, 2, 2)
    m = torch.zeros(2, 1, 2, 2)
    m[0, 0, 0, 0] = 1  # sample 0: one mask pixel out of four
    m[1, 0, :, 0] = 1  # sample 1: two mask pixels
    err = torch.zeros(2, 2, 2, 2)
    err[0, 0, 0, 0] = 2.0  # inside, channel 0: e^2 = 4
    err[0, 1, 1, 1] = 3.0  # outside (defect branch: not penalised)
    err[1, :, 0, 0] = 1.0  # inside, both channels: e^2 = 1 + 1
    eps_def = eps - err
    bg_err = torch.zeros(2, 2, 2, 2)
    bg_err[0, 0, 1, 1] = 3.0  # outside, e^2 = 9 over 3 background pixels x 2 channels
    bg_err[1, 1, 0, 1] = 2.0  # outside, e^2 = 4 over 2 background pixels x 2 channels
    eps_bg = eps - bg_err
    out = disentangled_loss(eps, eps_def, eps_bg, m, norm="area")
    matching = ((4 / (2 * 1)) + (2 / (2 * 2))) / 2  # 1.25
    regulariser = ((9 / (2 * 3)) + (4 / (2 * 2))) / 2  # 1.25
    torch.testing.assert_close(out["matching"], torch.tensor(matching))
    torch.testing.assert_close(out["regulariser"], torch.tensor(regulariser))
    torch.testing.assert_close(out["loss"], torch.tensor(matching + regulariser))
    # the same errors under "all": everything over B*C*H*W = 16 elements
    all_ = disentangled_loss(eps, eps_def, eps_bg, m, norm="all")
    torch.testing.assert_close(all_["matching"], torch.tensor((4 + 2) / 16))
    torch.testing.assert_close(all_["regulariser"], torch.tensor((9 + 4) / 16))


def test_area_norm_weighs_a_small_mask_like_a_large_one():
    """The same per-pixel error inside the mask gives the same matching term whatever the
    mask's size under "area"; under "all" it scales with the area."""
    eps = torch.zeros(1, 3, 16, 16)
    small, large = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    small[..., 2:4, 2:4] = 1
    large[..., 2:10, 2:10] = 1
    pred = eps - 0.5  # error 0.5 everywhere
    a_small = disentangled_loss(eps, pred, eps, small, norm="area")["matching"]
    a_large = disentangled_loss(eps, pred, eps, large, norm="area")["matching"]
    torch.testing.assert_close(a_small, torch.tensor(0.25))
    torch.testing.assert_close(a_large, torch.tensor(0.25))
    r_small = disentangled_loss(eps, pred, eps, small, norm="all")["matching"]
    r_large = disentangled_loss(eps, pred, eps, large, norm="all")["matching"]
    torch.testing.assert_close(r_large / r_small, torch.tensor(16.0))
    # an empty mask contributes nothing instead of dividing by zero
    z = disentangled_loss(eps, pred, eps, torch.zeros(1, 1, 16, 16), norm="area")
    assert z["matching"].item() == 0 and torch.isfinite(z["regulariser"])


def test_unknown_norm_is_refused():
    import pytest

    _, eps, m = _setup()
    with pytest.raises(ValueError, match="norm"):
        disentangled_loss(eps, eps, eps, m, norm="pixels")
