"""DDIM updates, inversion (Eq. 4 / 8), Theorem 1 and Eq. 9 sampling (Prop. 1)."""

from __future__ import annotations

import torch

from defectforge.diffusion import ddim_schedule, ddim_step
from defectforge.diffusion.ddim import chroma_range, range_bounds
from defectforge.methods.inversion import invert_masked, sample_eq9


def _sample(comps, z, m, steps, cond):
    c2, k2 = comps.context("mask")
    with torch.no_grad():
        for st in ddim_schedule(comps.scheduler, steps):
            z = ddim_step(z, comps.eps(z, st.t, c2, k2, m, cond_image=cond), st.alpha_t, st.alpha_prev)
    return z


def _record_unet_inputs(comps) -> list:
    """Wrap comps.eps: every call appends (t, the batch of latents the UNet sees)."""
    calls, eps = [], comps.eps

    def recording(z, t, *args, **kwargs):
        calls.append((int(t), z.clone()))
        return eps(z, t, *args, **kwargs)

    comps.eps = recording
    return calls


def test_ddim_step_matches_diffusers_scheduler(tiny):
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    for st in ddim_schedule(tiny.scheduler, 10):
        ref = tiny.scheduler.step(eps, st.t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ddim_step(z, eps, st.alpha_t, st.alpha_prev), ref, atol=1e-5, rtol=1e-5)


def test_inversion_then_sampling_reconstructs_the_latent(oracle):
    """DDIM inversion is first order (the UNet is evaluated at z_{t-1} in place of z_t), so
    even an exact denoiser leaves a discretisation error that shrinks like 1/steps.
    Stated tolerance: RMS error below 8 % of the latent's RMS at 50 steps (the paper's
    setting; measured 5.4 % with the tiny profile's linear schedule), and at least 3x
    smaller than at 10 steps (measured 27 %)."""
    g = torch.Generator().manual_seed(1)
    z0 = 0.5 * torch.randn(1, 3, 64, 64, generator=g)
    m = torch.zeros(1, 1, 64, 64)  # no mask: Eq. (8) is plain DDIM inversion, Eq. (4)
    errs = {}
    for steps in (10, 50):
        z_T = invert_masked(oracle, z0, m, steps)
        assert z_T.std() > 0.8  # really inverted to (near) unit-variance noise
        rec = _sample(oracle, z_T, m, steps, z0)
        errs[steps] = ((rec - z0).pow(2).mean().sqrt() / z0.pow(2).mean().sqrt()).item()
    assert errs[50] < 0.08, errs
    assert errs[50] < errs[10] / 3, errs


def test_eq9_keeps_the_background_and_changes_the_mask(oracle):
    g = torch.Generator().manual_seed(2)
    z0 = 0.5 * torch.randn(1, 3, 64, 64, generator=g)
    m = torch.zeros(1, 1, 64, 64)
    m[..., 20:40, 24:44] = 1
    z_T_m = invert_masked(oracle, z0, m, 50)
    assert (z_T_m * m).abs().max() == 0  # Eq. (8) keeps the mask region empty
    oracle.prompts.add_defect("crack")
    z_star, z_m = sample_eq9(oracle, z_T_m, z0, m, "crack", 50, guidance=2.0, generator=torch.Generator().manual_seed(3))
    out = 1 - m
    # Prop. 1: outside the mask z* follows the background branch exactly ...
    assert torch.equal(z_star * out, z_m * out)
    # ... which reconstructs the normal background (within the inversion tolerance, 8 % RMS) ...
    bg_err = ((z_star - z0) * out).pow(2).sum() / (z0 * out).pow(2).sum()
    assert bg_err.sqrt() < 0.08
    # ... while inside the mask the sample is new content: Theorem 1's noise eps carried by the
    # exact Gaussian ODE, z_0 = s eps / sqrt(a_T s^2 + 1 - a_T) (s = 0.5; up to the 50-step DDIM error).
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))  # sample_eq9's first draw
    a_T = ddim_schedule(oracle.scheduler, 50)[0].alpha_t
    want = m * eps * 0.5 / (a_T * 0.25 + 1 - a_T) ** 0.5
    err = ((z_star - want) * m).pow(2).sum().sqrt() / (want * m).pow(2).sum().sqrt()
    assert err < 0.1, err


def test_eq9_background_equality_holds_with_a_real_unet(tiny):
    """Same property through the real (untrained) tiny UNet with masked cross-attention."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    m = torch.zeros(1, 1, 64, 64)
    m[..., 10:30, 30:50] = 1
    tiny.prompts.add_defect("pit")
    z_T_m = invert_masked(tiny, z0, m, 4)
    z_star, z_m = sample_eq9(tiny, z_T_m, z0, m, "pit", 4, guidance=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(z_star * (1 - m), z_m * (1 - m))
    assert not torch.allclose(z_star * m, z_m * m)


def test_reading_the_background_from_the_inversion_path_is_exact(tiny):
    """background="inverted": outside the mask z*_0 is (1 - m) z_0 exactly, even with an
    untrained UNet whose plain inversion error is large."""
    g = torch.Generator().manual_seed(6)
    z0 = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    m = torch.zeros(1, 1, 64, 64)
    m[..., 8:24, 40:60] = 1
    tiny.prompts.add_defect("pit")
    path = []
    z_T_m = invert_masked(tiny, z0, m, 5, trajectory=path)
    assert len(path) == 5 and torch.equal(path[0], (1 - m) * z0)
    z_star, _ = sample_eq9(tiny, z_T_m, z0, m, "pit", 5, 2.0, torch.Generator().manual_seed(7), trajectory=path)
    torch.testing.assert_close(z_star * (1 - m), z0 * (1 - m))
    assert not torch.allclose(z_star * m, z0 * m)


def test_theorem1_initial_state_is_the_masked_inversion_plus_unit_noise_in_the_mask(oracle):
    """Theorem 1: with an exact denoiser the fully inverted latent differs from the masked one
    (Eq. 8) by unit Gaussian noise inside m and by nothing outside; the sampler starts from
    z*_T = z~^m_T + m * eps with that eps (the first state its UNet sees)."""
    g = torch.Generator().manual_seed(8)
    z0 = 0.5 * torch.randn(1, 3, 64, 64, generator=g)  # the oracle's data distribution, s = 0.5
    m = torch.zeros(1, 1, 64, 64)
    m[..., 16:48, 12:44] = 1
    z_T = invert_masked(oracle, z0, torch.zeros_like(m), 50)  # Eq. (4), the whole image
    z_T_m = invert_masked(oracle, z0, m, 50)  # Eq. (8)
    d = z_T - z_T_m
    torch.testing.assert_close(d * (1 - m), torch.zeros_like(d))
    inside = d[m.expand_as(d) > 0]
    assert abs(inside.mean()) < 0.1 and 0.9 < inside.std() < 1.1, (inside.mean(), inside.std())
    oracle.prompts.add_defect("crack")
    calls = _record_unet_inputs(oracle)
    sample_eq9(oracle, z_T_m, z0, m, "crack", 50, guidance=1.0, generator=torch.Generator().manual_seed(9))
    t, rows = calls[0]
    assert t == ddim_schedule(oracle.scheduler, 50)[0].t
    torch.testing.assert_close(rows[0:1], z_T_m, atol=0, rtol=0)  # the background branch: z^m_T = z~^m_T
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rows[1:2] - z_T_m, m * eps)  # z*_T - z~^m_T = m * eps
    start = (rows[1:2] - z_T_m)[m.expand_as(d) > 0]
    assert abs(start.std() - inside.std()) < 0.1  # the same statistics as Theorem 1's limit


def test_inverted_background_reads_the_path_at_every_step(tiny):
    """background="inverted": at the sampling step of timestep t the UNet sees, as the
    background branch and outside the mask of z*, the inverted latent at that same t
    (the output of the inversion step of t), not its neighbour."""
    g = torch.Generator().manual_seed(10)
    z0 = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    m = torch.zeros(1, 1, 64, 64)
    m[..., 8:24, 40:60] = 1
    tiny.prompts.add_defect("pit")
    steps = 5
    path = []
    calls = _record_unet_inputs(tiny)
    z_T_m = invert_masked(tiny, z0, m, steps, trajectory=path)
    inversion_t = [t for t, _ in calls]
    del calls[:]
    sample_eq9(tiny, z_T_m, z0, m, "pit", steps, 2.0, torch.Generator().manual_seed(11), trajectory=path)
    sched = ddim_schedule(tiny.scheduler, steps)
    inverted = dict(zip(inversion_t, path[1:] + [z_T_m]))  # t -> the output of the inversion step at t
    assert len(calls) == steps and sorted(inverted) == sorted(st.t for st in sched)
    for (t, rows), st in zip(calls, sched):
        assert t == st.t
        torch.testing.assert_close(rows[0:1], inverted[t], atol=0, rtol=0)
        torch.testing.assert_close(rows[1:2] * (1 - m), inverted[t] * (1 - m), atol=0, rtol=0)
        torch.testing.assert_close(rows[2:3], rows[1:2], atol=0, rtol=0)  # C_good sees the same z*


def _bright_surface(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 64, 64, generator=g) * 0.5 + 0.2  # bytes about 153..217


def test_sampled_background_branch_stays_empty_inside_the_mask_under_a_dark_defect_range(tiny):
    """background="sampled" (Eq. 9 as written) with the real-range bound of a dark pit on a
    bright surface (x0^ in [-0.9, -0.4] inside m, so 0 is outside the range): the background
    branch keeps m * z^m_t = 0 (Eq. 12, Prop. 1), z* equals it outside m, and the defect
    branch still ends inside the range."""
    z0 = _bright_surface(12)
    m = torch.zeros(1, 1, 64, 64)
    m[..., 20:34, 16:40] = 1
    soft = torch.maximum(m, 0.5 * torch.nn.functional.max_pool2d(m, 5, stride=1, padding=2))  # a feathered rim
    lo, hi = torch.full((3,), -0.9), torch.full((3,), -0.4)
    tiny.prompts.add_defect("pit")
    z_T_m = invert_masked(tiny, z0, m, 4)
    _, z_m_plain = sample_eq9(tiny, z_T_m, z0, m, "pit", 4, 1.5, torch.Generator().manual_seed(13), bound=1.0)
    calls = _record_unet_inputs(tiny)
    for w in (m, soft):
        del calls[:]
        z_star, z_m = sample_eq9(tiny, z_T_m, z0, m, "pit", 4, 1.5, torch.Generator().manual_seed(13),
                                 bound=range_bounds(lo, hi, w), soft=None if w is m else soft)
        assert len(calls) == 4
        for _, rows in calls:  # every state of the background branch the UNet sees
            assert (rows[0:1] * m).abs().max() == 0
        assert (z_m * m).abs().max() == 0
        torch.testing.assert_close(z_m, z_m_plain)  # the defect's range reaches no pixel of the background branch
        assert torch.equal(z_star * (1 - w.ceil()), z_m * (1 - w.ceil()))  # Prop. 1 beyond the blend
        inside = z_star[m.expand_as(z_star) > 0]  # the final alpha is 1: z*_0 is the last bounded x0^
        assert inside.min() >= -0.9 - 1e-5 and inside.max() <= -0.4 + 1e-5


def test_chroma_bound_moves_no_background_pixel_on_the_sampled_path(tiny):
    """The chroma bound (the crop's 1 % / 99 % chroma quantiles) binds the defect only: with
    background="sampled" the background branch and z* outside the mask are bit-identical with
    and without it, though about 2 % of the background's own pixels per channel (6 % in some
    channel, measured) lie outside that gamut."""
    g = torch.Generator().manual_seed(14)
    z0 = torch.rand(1, 3, 64, 64, generator=g) * 1.2 - 0.6  # a colour surface
    m = torch.zeros(1, 1, 64, 64)
    m[..., 30:44, 10:30] = 1
    gamut = chroma_range(z0)
    c = z0 - z0.mean(1, keepdim=True)
    outside_gamut = ((c < gamut[0]) | (c > gamut[1])).any(1, keepdim=True).float()
    assert (outside_gamut * (1 - m)).sum() / (1 - m).sum() > 0.02  # real background the bound would move
    tiny.prompts.add_defect("stain")
    z_T_m = invert_masked(tiny, z0, m, 4)
    runs = [sample_eq9(tiny, z_T_m, z0, m, "stain", 4, 1.5, torch.Generator().manual_seed(15), bound=1.0, chroma=ch)
            for ch in (None, gamut)]
    (plain_star, plain_m), (chroma_star, chroma_m) = runs
    assert torch.equal(chroma_m, plain_m)
    assert torch.equal(chroma_star * (1 - m), plain_star * (1 - m))
    assert not torch.allclose(chroma_star * m, plain_star * m)  # it does bind the defect
