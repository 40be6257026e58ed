"""The samplers against the papers' equations, with an oracle UNet.

The oracle's noise prediction depends on z_t, on t, on the prompt context (C_1, C_2,
C_good give different predictions) and on the mask it is given, so a sampler that
drops (1 - m) from Eq. 8, swaps C_1 and C_2, forgets Theorem 1's noise, applies the
guidance weight to the wrong term, swaps Eq. 9's mix or the blending of blended
latent diffusion gives different numbers. Each test recomputes the expected values
with its own loop written from the equations of
../shared/seeds/ddim-inversion-disentangled-background.txt (Eq. 3, 8, 9, Theorem 1),
one-weight guidance against the "good" prompt under c_p (``guided``) and blended latent
diffusion, never by calling the
code under test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from defectforge.diffusion.ddim import bound_eps, ddim_step, guided
from defectforge.diffusion.sampling import to_uint8
from defectforge.methods.blended import BlendedConfig, Blended, sample_blended
from defectforge.methods.inversion import InversionConfig, Inversion, invert_masked, sample_eq9

torch.set_num_threads(1)
R = 16  # latent / pixel side of the oracle model


class OracleUNet(nn.Module):
    """eps(z, t, C, m) = 0.5 sqrt(1 - a_t) tanh(z) + (0.3 + 0.7 m) v(C) + 0.2 m tanh(mean_c z) + shift.

    v(C) = tanh(3 P^T u), u the unit-normalised mean of the context tokens, P a fixed
    random (D, 3) matrix: every prompt gets its own direction. ``shift`` (default 0) pushes
    x0^ out of range for the output-range tests. Deterministic, row-wise (the batch
    rows do not interact), and it records a defect-attention map for AttentionStore.
    """

    def __init__(self, alphas_cumprod, dim: int, shift: float = 0.0):
        super().__init__()
        self.alphas = alphas_cumprod
        self.P = torch.randn(dim, 3, generator=torch.Generator().manual_seed(11))
        self.shift = shift
        self.config = SimpleNamespace(out_channels=3, in_channels=3, sample_size=R)

    def eps(self, z, t, ctx, m):
        a = self.alphas[t.long()].view(-1, 1, 1, 1).to(z)
        u = ctx.mean(1)
        v = torch.tanh(3 * (u / u.norm(dim=-1, keepdim=True)) @ self.P)[:, :, None, None]
        return 0.5 * (1 - a).sqrt() * torch.tanh(z) + (0.3 + 0.7 * m) * v + 0.2 * m * torch.tanh(z.mean(1, keepdim=True)) - self.shift

    def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        m = kw["region_mask"]
        store = kw.get("attention_store")
        if store is not None:
            att = torch.sigmoid(x[:, :1, :, :].mean(1)) * m[:, 0]
            store.add("oracle", att, att)
        return SimpleNamespace(sample=self.eps(x[:, :3], t, encoder_hidden_states, m))


def _comps(shift: float = 0.0):
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("crack")
    dim = comps.context("mask")[0].shape[-1]
    comps.unet = OracleUNet(comps.scheduler.alphas_cumprod, dim, shift)
    return comps


@pytest.fixture(scope="module")
def comps():
    return _comps()


def _oracle(comps, z, t, which, m):
    """The oracle's prediction for one branch, prompts built here (C_1, C_2, C_good)."""
    ctx = comps.context(*which)[0]
    return comps.unet.eps(z, torch.tensor([t]), ctx, m)


def _schedule(scheduler, steps):
    """(t, a_t, a_{t-1}) along the sampling path, noisiest first (diffusers' timesteps)."""
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    a = [float(scheduler.alphas_cumprod[t]) for t in ts]
    return list(zip(ts, a, a[1:] + [float(scheduler.final_alpha_cumprod)]))


def _ddim(z, e, a, a_prev):
    """DDIM (eta = 0) in the x0^ + direction form: sqrt(a_{t-1}) x0^ + sqrt(1 - a_{t-1}) eps (= Eq. 3)."""
    x0 = (z - (1 - a) ** 0.5 * e) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e


def _bounded(z, e, a, bound, gray):
    """x0^ clamped (and on the grey axis), eps re-derived: the returned eps reproduces it."""
    x0 = (z - (1 - a) ** 0.5 * e) / a**0.5
    if bound:
        x0 = x0.clamp(-bound, bound)
    if gray:
        x0 = x0.mean(1, keepdim=True).expand_as(x0)
    return (z - a**0.5 * x0) / (1 - a) ** 0.5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.rand(1, 3, R, R, generator=g) * 1.6 - 0.8
    m = torch.zeros(1, 1, R, R)
    m[..., 4:11, 5:12] = 1
    return z0, m


# ------------------------------------------------------------------ Eq. 8
def test_eq8_masked_inversion_matches_the_paper(comps):
    z0, m = _inputs()
    steps = 6
    # Eq. (8), written out: z~_t = sqrt(a_t)[z~_{t-1}/sqrt(a_{t-1}) + (1-m)(sqrt(1/a_t - 1) - sqrt(1/a_{t-1} - 1)) eps(z~_{t-1}, C_2)]
    z = (1 - m) * z0
    for t, a_t, a_prev in reversed(_schedule(comps.scheduler, steps)):
        e = _oracle(comps, z, t, ("mask",), m)
        z = a_t**0.5 * (z / a_prev**0.5 + (1 - m) * ((1 / a_t - 1) ** 0.5 - (1 / a_prev - 1) ** 0.5) * e)
    got = invert_masked(comps, z0, m, steps)
    torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
    assert (got * m).abs().max() == 0  # the masked area stays empty: (1 - m) is in the update


# ------------------------------------------------------------------ Theorem 1 + Eq. 9
def _eq9_reference(comps, z_T, z0, m, steps, w, seed, *, bound=0.0, gray=False, soft=None, noised=False):
    gen = torch.Generator().manual_seed(seed)
    z_star = z_T + m * torch.randn(z_T.shape, generator=gen)  # Theorem 1: z*_T = z~^m_T + m * eps
    z_m = z_T
    s = m if soft is None else soft
    for t, a, a_prev in _schedule(comps.scheduler, steps):
        z_in = z_star
        if noised:  # Eq. (6) outside the mask for the defect branch
            z_in = m * z_star + (1 - m) * (a**0.5 * z0 + (1 - a) ** 0.5 * torch.randn(z0.shape, generator=gen))
        e_bg = _oracle(comps, z_m, t, ("mask",), m)  # eps(z^m_t, t, C_2)
        e_c1 = _oracle(comps, z_in, t, ("defect", "crack"), m)  # eps(z*_t, t, C_1)
        e_good = _oracle(comps, z_in, t, ("good",), m)
        e_def = e_good + w * (e_c1 - e_good)  # DefectDiffu Eq. (4)
        e_star = (1 - s) * e_bg + s * e_def  # Eq. (9)
        e_bgm = (1 - m) * e_bg
        if bound or gray:
            e_star = _bounded(z_star, e_star, a, bound, gray)
            e_bgm = _bounded(z_m, e_bgm, a, bound, gray)
        z_star = _ddim(z_star, e_star, a, a_prev)
        z_m = _ddim(z_m, e_bgm, a, a_prev)
    return z_star, z_m


@pytest.mark.parametrize("w", [1.0, 1.5])
def test_eq9_sampling_matches_the_paper(comps, w):
    z0, m = _inputs(1)
    steps = 6
    z_T = invert_masked(comps, z0, m, steps)
    want_star, want_m = _eq9_reference(comps, z_T, z0, m, steps, w, seed=3)
    got_star, got_m = sample_eq9(comps, z_T, z0, m, "crack", steps, w, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got_star, want_star, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_m, want_m, atol=1e-5, rtol=1e-5)


def test_eq9_with_the_realism_options_matches_its_reference(comps):
    """Bounded x0^ on the grey axis, feathered weights in the mix, noised defect-branch background."""
    z0, m = _inputs(2)
    steps = 5
    soft = torch.maximum(m, 0.5 * torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1))
    z_T = invert_masked(comps, z0, m, steps)
    want, _ = _eq9_reference(comps, z_T, z0, m, steps, 1.5, seed=4, bound=1.0, gray=True, soft=soft, noised=True)
    got, _ = sample_eq9(comps, z_T, z0, m, "crack", steps, 1.5, torch.Generator().manual_seed(4),
                        bound=1.0, gray=True, soft=soft, noised_background=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the final alpha is 1 (set_alpha_to_one), so z*_0 is the last bounded x0^: in [-1, 1], grey
    assert got.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(got, got.mean(1, keepdim=True).expand_as(got), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ guidance, DDIM, bound
def test_guided_is_guidance_against_the_good_prompt():
    c, b = torch.tensor([3.0]), torch.tensor([1.0])
    assert guided(c, b, 0.0).item() == 1.0  # w = 0: the baseline (C_good) alone
    assert guided(c, b, 1.0).item() == 3.0  # w = 1: plain conditioning
    assert guided(c, b, 2.0).item() == 5.0  # b + 2 (c - b)


def test_bound_eps_is_diffusers_clip_sample(comps):
    """ddim_step with the bounded eps = DDIMScheduler(clip_sample=True).step(use_clipped_model_output=True)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(comps.scheduler.config, clip_sample=True, clip_sample_range=1.0)
    g = torch.Generator().manual_seed(5)
    z, e = torch.randn(1, 3, 4, 4, generator=g) * 2, torch.randn(1, 3, 4, 4, generator=g) * 2
    sched.set_timesteps(10)
    for t, a, a_prev in _schedule(comps.scheduler, 10):
        ref = sched.step(e, t, z, eta=0.0, use_clipped_model_output=True).prev_sample
        got = ddim_step(z, bound_eps(z, e, a, 1.0), a, a_prev)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)  # float32: eps re-derived over sqrt(1 - a_t)
        x0 = (z - (1 - a) ** 0.5 * bound_eps(z, e, a, 1.0)) / a**0.5
        assert x0.abs().max() <= 1 + 1e-4
    assert torch.equal(bound_eps(z, e, 0.5, 0.0), e)  # off: unchanged


# ------------------------------------------------------------------ blended latent diffusion
def _blended_reference(comps, z0, m, steps, w, free_fraction, edit_fraction, seed, soft=None, bound=0.0):
    """AdaBLDM's ddim_sampling_with_pixel_latent_blend (cldm/ddim_hacked.py) with N steps:
    z_T pure noise; steps before round(free_fraction N) free; latent blending *before* steps
    n_free..cutoff (cutoff = N - round(edit_fraction N)); image editing *after* steps >= cutoff
    (pixel profile: x^ = x0^, pasted with z_0 outside the mask, re-noised to a_{t-1})."""
    gen = torch.Generator().manual_seed(seed)
    sched = _schedule(comps.scheduler, steps)
    s = m if soft is None else soft
    n_free = int(round(free_fraction * len(sched)))
    cutoff = len(sched) - int(round(edit_fraction * len(sched)))
    z = torch.randn(z0.shape, generator=gen)  # z_T ~ N(0, I)
    for i, (t, a, a_prev) in enumerate(sched):
        if n_free <= i <= cutoff:  # latent blending: the normal latent noised to a_t outside the mask
            z = s * z + (1 - s) * (a**0.5 * z0 + (1 - a) ** 0.5 * torch.randn(z0.shape, generator=gen))
        e_c1 = _oracle(comps, z, t, ("defect", "crack"), m)
        e_good = _oracle(comps, z, t, ("good",), m)
        e = e_good + w * (e_c1 - e_good)
        if bound:
            e = _bounded(z, e, a, bound, False)
        x0 = (z - (1 - a) ** 0.5 * e) / a**0.5
        z = _ddim(z, e, a, a_prev)
        if i >= cutoff:  # image editing: x0^ inside, the normal image outside, re-noised to a_{t-1}
            edited = s * x0 + (1 - s) * z0
            z = a_prev**0.5 * edited + (1 - a_prev) ** 0.5 * torch.randn(z0.shape, generator=gen)
    return z


@pytest.mark.parametrize("soft", [False, True])
def test_blended_latent_diffusion_matches_its_reference(comps, soft):
    z0, m = _inputs(3)
    weights = torch.maximum(m, 0.5 * torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)) if soft else None
    want = _blended_reference(comps, z0, m, 10, 1.5, 0.5, 0.2, seed=6, soft=weights, bound=1.0 if soft else 0.0)
    got = sample_blended(comps, z0, m, "crack", 10, 1.5, 0.5, torch.Generator().manual_seed(6), edit_fraction=0.2,
                         soft=weights, bound=1.0 if soft else 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ output range
def test_to_uint8_saturates_instead_of_wrapping():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 1.02, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


@pytest.mark.parametrize("cls,cfg", [(Inversion, InversionConfig), (Blended, BlendedConfig)])
def test_output_range_with_an_overshooting_model(cls, cfg):
    """An oracle whose noise prediction is always < -1 (x0^ runs far above 1): without the
    bound the sample leaves [-1, 1] and the image ends at the top of the range, never
    wrapped round to dark values; with clip_x0 the sample stays in [-1, 1] and bright."""
    comps = _comps(shift=6.0)
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[14:24, 15:25] = True
    extra = {"trimap": False} if cls is Blended else {}
    z0 = torch.from_numpy(img[12:28, 12:28]).permute(2, 0, 1)[None].float() / 127.5 - 1
    m = torch.zeros(1, 1, R, R)
    m[..., 2:12, 3:13] = 1
    raw = sample_blended(comps, z0, m, "crack", 4, 2.0, 0.2, torch.Generator().manual_seed(0))
    assert raw.max() > 1.5  # the test model really overshoots without the bound
    bounded = sample_blended(comps, z0, m, "crack", 4, 2.0, 0.2, torch.Generator().manual_seed(0), bound=1.0)
    assert bounded.abs().max() <= 1 + 1e-5
    for clip in (True, False):
        r = cls.from_pretrained(comps, cfg(steps=4, feather=0, clip_x0=clip, **extra), device="cpu").generate(img, mask, "crack", 0)
        assert r.image.dtype == np.uint8 and r.metadata["x0_bound"] == (1.0 if clip else 0.0)
        assert (r.image[mask] >= 240).all(), clip  # saturated at the top, not wrapped (a wrap lands below 250)
        assert np.array_equal(r.image[~mask], img[~mask])
