"""DefectDiffu (../shared/seeds/defectdiffu-consistency-modeling.txt) against its equations.

The oracle UNet's prediction depends on z_t, t, the mask, and separately on the tokens
inside the mask (defect condition c_d / c_g) and outside it (product condition c_p or the
null 0), so Eq. 4 with swapped weights, a missing null term, a wrong context or a sampler
that ignores the mask gives different numbers. Expected values are recomputed here from
the paper's formulas, never by calling the code under test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectforge.diffusion.ddim import double_free, guided
from defectforge.diffusion.prompts import build_context
from defectforge.methods.defectdiffu.training import AdaptiveAttention

from test_equations import _inputs  # the same seeded z0 and mask as the Eq. 8 / 9 tests

torch.set_num_threads(1)
R = 16


class PromptOracle(nn.Module):
    """eps = 0.5 sqrt(1 - a_t) tanh(z) + (0.3 + 0.7 m) v(C_in) + (1 - m) 0.6 v(C_out) + 0.2 v(C) m tanh(mean_c z).

    v(C) = tanh(3 P^T u), u the unit-normalised mean of a token group: each group of
    tokens (good, defect, product, null) gets its own direction. It records the inside
    tokens' attention share as sigmoid(tanh(mean_c z) + 2 v(C_in)_0) * m for AttentionStore, and the
    contexts it was called with."""

    def __init__(self, alphas_cumprod, dim: int):
        super().__init__()
        self.alphas = alphas_cumprod
        self.P = torch.randn(dim, 3, generator=torch.Generator().manual_seed(5))
        self.config = SimpleNamespace(out_channels=3, in_channels=3, sample_size=R)
        self.calls = []  # contexts of every call
        self.inputs = []  # and its latents and token kinds
        self.kinds = []

    def v(self, tokens):
        u = tokens.mean(1)
        return torch.tanh(3 * (u / u.norm(dim=-1, keepdim=True)) @ self.P)[:, :, None, None]

    def eps(self, z, t, ctx, kinds, m):
        a = self.alphas[t.long()].view(-1, 1, 1, 1).to(z)
        kinds = kinds if kinds.ndim == 2 else kinds[None].expand(z.shape[0], -1)
        v_in = torch.cat([self.v(c[k][None]) for c, k in zip(ctx, kinds)])
        v_out = torch.cat([self.v(c[~k][None]) for c, k in zip(ctx, kinds)])
        return (0.5 * (1 - a).sqrt() * torch.tanh(z) + (0.3 + 0.7 * m) * v_in + (1 - m) * 0.6 * v_out
                + 0.2 * self.v(ctx) * m * torch.tanh(z.mean(1, keepdim=True)))

    def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        m = kw["region_mask"]
        self.calls.append(encoder_hidden_states.detach().clone())
        self.inputs.append(x.detach().clone())
        self.kinds.append(kw["token_kinds"].clone())
        store = kw.get("attention_store")
        if store is not None and store.records_share:  # training: two "layers", 16x16 and 8x8
            v_in = torch.cat([self.v(c[k][None]) for c, k in zip(encoder_hidden_states, kw["token_kinds"])])
            share = torch.sigmoid(torch.tanh(x[:, :3].mean(1)) + 2 * v_in[:, 0])
            store.add_share("oracle", share.flatten(1), m[:, 0].flatten(1))
            store.add_share("oracle2", F.avg_pool2d(share[:, None], 2).flatten(1), F.avg_pool2d(m, 2).flatten(1))
        elif store is not None:
            kinds = kw["token_kinds"]
            v_in = torch.cat([self.v(c[k][None]) for c, k in zip(encoder_hidden_states, kinds)])  # the inside tokens' direction
            att = torch.sigmoid(torch.tanh(x[:, :3].mean(1)) + 2 * v_in[:, 0]) * m[:, 0]
            store.add("oracle", att, att)
        return SimpleNamespace(sample=self.eps(x[:, :3], t, encoder_hidden_states, kw["token_kinds"], m))


def _comps():
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("crack")
    comps.prompts.add_null()
    dim = comps.context("mask")[0].shape[-1]
    comps.unet = PromptOracle(comps.scheduler.alphas_cumprod, dim)
    return comps


@pytest.fixture()
def comps():
    return _comps()


def _ctx(comps, inside, outside):
    return build_context(comps.prompts, inside, "crack" if inside == "defect" else None, outside)


def _oracle(comps, z, t, inside, outside, m):
    ctx, kinds = _ctx(comps, inside, outside)
    return comps.unet.eps(z, torch.tensor([t]), ctx, kinds, m)


# ------------------------------------------------------------------ Eq. 4
def test_eq4_double_free_guidance_from_the_null_condition(comps):
    z, m = _inputs()
    t = 500
    e_g0 = _oracle(comps, z, t, "good", "null", m)  # eps(x_t, t, c_g, 0)
    e_gp = _oracle(comps, z, t, "good", "bg", m)  # eps(x_t, t, c_g, c_p)
    e_d0 = _oracle(comps, z, t, "defect", "null", m)  # eps(x_t, t, c_d, 0)
    assert not torch.allclose(e_g0, e_gp) and not torch.allclose(e_g0, e_d0)
    w_p, w_d = 1.3, 2.7
    expected = e_g0 + w_p * (e_gp - e_g0) + w_d * (e_d0 - e_g0)  # Eq. (4)
    torch.testing.assert_close(double_free(e_g0, e_gp, e_d0, w_p, w_d), expected)
    # the two ends of the scales: the product's normal image, and the bare defect direction
    torch.testing.assert_close(double_free(e_g0, e_gp, e_d0, 1.0, 0.0), e_gp)
    torch.testing.assert_close(double_free(e_g0, e_gp, e_d0, 0.0, 1.0), e_d0)
    torch.testing.assert_close(double_free(e_g0, e_gp, e_d0, 0.0, 0.0), e_g0)


def test_guided_is_guidance_under_c_p_not_eq4_at_w_p_1(comps):
    """``guided`` (blended, inversion) takes the defect direction against c_g under c_p; Eq. 4 at
    w_p = 1 takes it under the null condition. Both written out with the oracle's predictions,
    whose defect direction depends on c_p as a trained model's does."""
    z, m = _inputs()
    t = 500
    e_g0 = _oracle(comps, z, t, "good", "null", m)  # eps(x_t, t, c_g, 0)
    e_gp = _oracle(comps, z, t, "good", "bg", m)  # eps(x_t, t, c_g, c_p)
    e_d0 = _oracle(comps, z, t, "defect", "null", m)  # eps(x_t, t, c_d, 0)
    e_dp = _oracle(comps, z, t, "defect", "bg", m)  # eps(x_t, t, c_d, c_p)
    e_g0, e_gp, e_d0, e_dp = (e.detach() for e in (e_g0, e_gp, e_d0, e_dp))
    w = 2.5
    eq4 = e_g0 + 1.0 * (e_gp - e_g0) + w * (e_d0 - e_g0)  # Eq. (4), w_p = 1
    torch.testing.assert_close(double_free(e_g0, e_gp, e_d0, 1.0, w), eq4)
    torch.testing.assert_close(guided(e_dp, e_gp, w), e_gp + w * (e_dp - e_gp))  # guidance under c_p
    assert float(((e_dp - e_gp) - (e_d0 - e_g0)).abs().max()) > 0.05  # the directions differ ...
    assert float((guided(e_dp, e_gp, w) - eq4).abs().max()) > 0.1  # ... so guided is not Eq. 4 at w_p = 1
    # they agree exactly where the defect direction does not depend on c_p
    torch.testing.assert_close(guided(e_gp + (e_d0 - e_g0), e_gp, w), eq4)


def test_null_tokens_are_their_own_condition(comps):
    """The null condition is a learned token group distinct from c_p; a model without one is one clear error."""
    from defectforge.diffusion import build_tiny_components
    from defectforge.errors import DefectforgeError

    assert not torch.equal(comps.prompts.embed("null"), comps.prompts.embed("bg"))
    fresh = build_tiny_components(seed=0)
    with pytest.raises(DefectforgeError, match="null-condition"):
        build_context(fresh.prompts, "good", None, "null")


# ------------------------------------------------------------------ Algorithm 1
def test_algorithm1_drops_the_right_conditions_with_the_right_probability():
    from defectforge.methods.defectdiffu.training import double_free_dropout

    n, p1, p2 = 20000, 0.2, 0.3
    inside = ["good", "defect"] * (n // 2)
    c_d, c_p = double_free_dropout(inside, p1, p2, np.random.default_rng(0))
    c_d, c_p, inside = np.array(c_d), np.array(c_p), np.array(inside)
    good, defect = inside == "good", inside == "defect"
    assert set(c_d[good]) == {"good"}  # a good row keeps c_g (nothing to drop)
    assert set(c_p) == {"bg", "null"} and set(c_d) == {"good", "defect"}
    tol = 0.015
    assert abs((c_p[good] == "null").mean() - p1) < tol  # line 1
    assert abs((c_d[defect] == "good").mean() - p2) < tol  # line 3
    assert abs((c_p[defect] == "null").mean() - (1 - (1 - p1) ** 2)) < tol  # lines 1 and 4
    both = ((c_d[defect] == "good") & (c_p[defect] == "null")).mean()  # independent draws
    assert abs(both - p2 * (1 - (1 - p1) ** 2)) < tol
    # seeded: the same generator state gives the same conditions; the draws are the paper's, in order
    again = double_free_dropout(list(inside[:6]), p1, p2, np.random.default_rng(0))
    u = np.random.default_rng(0).random(12)  # good: 1 draw; defect: 3 draws (lines 1, 3, 4)
    by_hand_d, by_hand_p, k = [], [], 0
    for row in inside[:6]:
        d, p = row, "bg"
        if u[k] < p1:
            p = "null"
        k += 1
        if row == "defect":
            if u[k] < p2:
                d = "good"
            if u[k + 1] < p1:
                p = "null"
            k += 2
        by_hand_d.append(d)
        by_hand_p.append(p)
    assert again == (by_hand_d, by_hand_p)
    # p_1 = p_2 = 0: the conditions are left as they are
    assert double_free_dropout(list(inside[:10]), 0.0, 0.0, np.random.default_rng(1)) == (list(inside[:10]), ["bg"] * 10)


def test_training_step_feeds_the_null_condition_and_trains_its_tokens(comps):
    """With Algorithm 1's product conditions the C_1 rows carry the null tokens outside the
    mask, the loss changes with them, and the null tokens receive gradient."""
    from defectforge.diffusion.training import disentangled_step

    x, m = _inputs(1)
    x, m = x.expand(2, -1, -1, -1).clone(), m.expand(2, -1, -1, -1).clone()
    null = comps.prompts.tokens["null"]
    null.requires_grad_(True)
    comps.unet.calls.clear()
    out = disentangled_step(comps, x, m, ["defect", "good"], "crack", torch.Generator().manual_seed(0), outside=["null", "bg"])
    ctx = comps.unet.calls[-1]  # rows: C_1 (2 rows), then C_2 (2 rows)
    n = comps.prompts.tokens_per_concept
    torch.testing.assert_close(ctx[0, n:], null.detach())
    torch.testing.assert_close(ctx[0, :n], comps.prompts.embed("defect", "crack").detach())
    torch.testing.assert_close(ctx[1, n:], comps.prompts.embed("bg").detach())
    out["loss"].backward()
    assert null.grad is not None and null.grad.abs().sum() > 0
    plain = disentangled_step(comps, x, m, ["defect", "good"], "crack", torch.Generator().manual_seed(0))
    assert not torch.allclose(plain["loss"], out["loss"])



def test_training_step_c2_rows_are_the_masked_latent_with_c2_in_the_regulariser(comps):
    """Eq. (5)-(7), the C_2 rows: rows b..2b-1 of the batched UNet call are z_t^m (Eq. 7, zero
    inside m) with C_2 = [C_m, C_bg] (also where Algorithm 1 dropped a C_1 row's c_p), and their
    prediction enters only the background regulariser ||(1 - m)(eps - eps(z_t^m, t, C_2))||^2."""
    from defectforge.diffusion.training import disentangled_step

    x = torch.cat([_inputs(1)[0], _inputs(2)[0]])
    m = torch.zeros(2, 1, R, R)
    m[0, :, 4:11, 5:12] = 1
    m[1, :, 8:14, 2:7] = 1
    comps.unet.calls.clear()
    out = disentangled_step(comps, x, m, ["defect", "good"], "crack", torch.Generator().manual_seed(0), outside=["null", "bg"])
    # the step's draws, in order: t, then eps
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, comps.scheduler.config.num_train_timesteps, (2,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    a = comps.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps  # Eq. (6)
    z_t_m = a.sqrt() * ((1 - m) * x) + (1 - a).sqrt() * ((1 - m) * eps)  # Eq. (7)
    latents, ctx, kinds = comps.unet.inputs[-1], comps.unet.calls[-1], comps.unet.kinds[-1]
    assert latents.shape[0] == 4  # rows: C_1 (2 rows), then C_2 (2 rows)
    torch.testing.assert_close(latents[:2], z_t)
    torch.testing.assert_close(latents[2:], z_t_m)
    assert latents[2:][m.expand(-1, 3, -1, -1).bool()].abs().max() == 0  # the defect is not in z_t^m
    n = comps.prompts.tokens_per_concept
    c_2 = torch.cat([comps.prompts.embed("mask"), comps.prompts.embed("bg")]).detach()
    for row in (2, 3):
        torch.testing.assert_close(ctx[row], c_2)
        assert kinds[row].tolist() == [True] * n + [False] * n  # C_m attends inside m, C_bg outside
    # Eq. (5) by hand, "all" norm: both terms over every element
    e_1 = torch.cat([_oracle(comps, z_t[i:i + 1], int(t[i]), k, o, m[i:i + 1]) for i, (k, o) in enumerate((("defect", "null"), ("good", "bg")))])
    e_2 = torch.cat([_oracle(comps, z_t_m[i:i + 1], int(t[i]), "mask", "bg", m[i:i + 1]) for i in range(2)])
    matching = (m * (eps - e_1)).pow(2).mean()
    regulariser = ((1 - m) * (eps - e_2)).pow(2).mean()
    assert float(regulariser.detach()) > 0.01
    torch.testing.assert_close(out["matching"], matching.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["regulariser"], regulariser.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], (matching + regulariser).detach(), rtol=1e-5, atol=1e-7)
    # "area" norm: the regulariser is the mean over each sample's background elements
    area = disentangled_step(comps, x, m, ["defect", "good"], "crack", torch.Generator().manual_seed(0), outside=["null", "bg"],
                             loss_norm="area")
    per = ((1 - m) * (eps - e_2)).pow(2).flatten(1).sum(1) / (3 * (1 - m).flatten(1).sum(1))
    torch.testing.assert_close(area["regulariser"], per.mean().detach(), rtol=1e-5, atol=1e-7)
    # C_m is learned through the regulariser only
    c_m = comps.prompts.tokens["mask"]
    g_match = torch.autograd.grad(out["matching"], c_m, retain_graph=True, allow_unused=True)[0]
    assert g_match is None or g_match.abs().sum() == 0
    assert torch.autograd.grad(out["regulariser"], c_m)[0].abs().sum() > 0


# ------------------------------------------------------------------ generation
def _schedule(scheduler, steps):
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    a = [float(scheduler.alphas_cumprod[t]) for t in ts]
    return list(zip(ts, a, a[1:] + [float(scheduler.final_alpha_cumprod)]))


def _ddim(z, e, a, a_prev):
    x0 = (z - (1 - a) ** 0.5 * e) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e


def test_sampler_is_ddim_with_eq4_inside_the_mask_and_the_noised_input_outside(comps):
    from defectforge.diffusion.attention import AttentionStore
    from defectforge.methods.defectdiffu import sample_double_free

    z0, m = _inputs(2)
    steps, w_p, w_d = 5, 1.2, 2.5
    store = AttentionStore()
    got = sample_double_free(comps, z0, m, "crack", steps, w_p, w_d, torch.Generator().manual_seed(3), store, 0.4)
    g = torch.Generator().manual_seed(3)
    sched = _schedule(comps.scheduler, steps)
    z = sched[0][1] ** 0.5 * z0 + (1 - sched[0][1]) ** 0.5 * torch.randn(z0.shape, generator=g)
    maps = []
    for i, (t, a, a_prev) in enumerate(sched):
        if i >= 3:  # the last 0.4 of 5 steps: the defect tokens' attention of the eps(c_d, 0) row
            v_def = comps.unet.v(comps.prompts.embed("defect", "crack")[None])[:, 0]
            maps.append(torch.sigmoid(torch.tanh(z.mean(1)) + 2 * v_def) * m[:, 0])
        e_g0 = _oracle(comps, z, t, "good", "null", m)
        e_gp = _oracle(comps, z, t, "good", "bg", m)
        e_d0 = _oracle(comps, z, t, "defect", "null", m)
        e = e_g0 + w_p * (e_gp - e_g0) + w_d * (e_d0 - e_g0)  # Eq. (4)
        z = _ddim(z, e, a, a_prev)
        bg = a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * torch.randn(z0.shape, generator=g)
        z = m * z + (1 - m) * bg
    torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.mean_map((R, R)), sum(maps) / len(maps), atol=1e-5, rtol=1e-5)


def _image():
    rng = np.random.default_rng(0)
    img = np.repeat((rng.random((32, 32, 1)) * 60 + 100).astype(np.uint8), 3, axis=2)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 12:22] = True
    return img, mask


def _method(comps, **kw):
    from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig

    cfg = DefectDiffuConfig(steps=4, device="cpu", feather=0.0, **kw)
    return DefectDiffu.from_pretrained(comps, cfg)


def test_generation_depends_on_prompt_and_mask_and_keeps_the_background(comps):
    img, mask = _image()
    base = _method(comps).generate(img, mask, "crack", seed=1)
    assert base.image.shape == img.shape and base.attention is not None
    np.testing.assert_array_equal(base.image[~mask], img[~mask])  # background kept byte for byte
    assert not np.array_equal(base.image[mask], img[mask])
    # the defect strength w_d changes the result: the defect prompt is used
    weak = _method(comps, w_d=0.0).generate(img, mask, "crack", seed=1)
    assert np.abs(weak.image[mask].astype(int) - base.image[mask].astype(int)).mean() > 1
    # so does the product scale w_p
    other_p = _method(comps, w_p=0.0).generate(img, mask, "crack", seed=1)
    assert not np.array_equal(other_p.image[mask], base.image[mask])
    # another mask: other pixels change
    mask2 = np.zeros_like(mask)
    mask2[4:12, 4:14] = True
    moved = _method(comps).generate(img, mask2, "crack", seed=1)
    np.testing.assert_array_equal(moved.image[~mask2], img[~mask2])
    assert not np.array_equal(moved.image[mask2], img[mask2])
    # same seed, same sample
    np.testing.assert_array_equal(_method(comps).generate(img, mask, "crack", seed=1).image, base.image)


def test_mask_is_the_iterative_threshold_of_the_attention_inside_the_target(comps):
    img, mask = _image()
    res = _method(comps).generate(img, mask, "crack", seed=1)
    v = res.attention[mask].astype(np.float64)
    t = v.mean()  # Ridler-Calvard by hand
    while True:
        new = (v[v > t].mean() + v[v <= t].mean()) / 2
        if abs(new - t) < 1e-4:
            t = new
            break
        t = new
    assert res.metadata["mask_threshold"] == pytest.approx(t, abs=1e-9)
    expected = (res.attention > t) & mask
    assert 0 < expected.sum() < mask.sum()  # a real split, not all or nothing
    np.testing.assert_array_equal(res.mask, expected)
    assert res.metadata["mask_origin"] == "defectdiffu-attention"
    # the fixed threshold, and the target mask when asked
    thr = round(float(np.median(v)), 3)  # the attention does not depend on the threshold
    fixed = _method(comps, threshold="fixed", threshold_value=thr).generate(img, mask, "crack", seed=1)
    assert 0 < fixed.mask.sum() < mask.sum()
    np.testing.assert_array_equal(fixed.mask, (fixed.attention > thr) & mask)
    # nothing above the threshold: the target mask, and the metadata says so
    empty = _method(comps, threshold="fixed", threshold_value=1.0).generate(img, mask, "crack", seed=1)
    np.testing.assert_array_equal(empty.mask, mask)
    assert empty.metadata["mask_origin"] == "defectdiffu-attention-empty-target"
    np.testing.assert_array_equal(_method(comps, mask_source="target").generate(img, mask, "crack", seed=1).mask, mask)


def test_iterative_threshold_on_two_modes():
    from defectforge.methods.defectdiffu import iterative_threshold

    v = np.array([0.1, 0.12, 0.14, 0.7, 0.8, 0.9])
    # start 0.46; means 0.12 and 0.8 -> 0.46: converged at once
    assert iterative_threshold(v) == pytest.approx(0.46)
    v = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 0.2])
    # start 0.2: lo {0,0,0,0,0.2} mean 0.04, hi {1} -> 0.52; then lo mean 0.04, hi 1 -> 0.52
    assert iterative_threshold(v) == pytest.approx(0.52)


def test_a_model_without_null_tokens_is_one_clear_error(comps):
    from defectforge.diffusion import build_tiny_components
    from defectforge.errors import DefectforgeError

    fresh = build_tiny_components(seed=0)
    fresh.prompts.add_defect("crack")
    fresh.unet = comps.unet
    img, mask = _image()
    with pytest.raises(DefectforgeError, match="cond_dropout_product"):
        _method(fresh).generate(img, mask, "crack", seed=0)


def test_registered_with_its_params_section():
    from defectforge.params.file import load_params
    from defectforge.methods import get_method_class, needs_checkpoints
    from defectforge.methods.defectdiffu import DefectDiffu

    assert get_method_class("defectdiffu") is DefectDiffu and needs_checkpoints("defectdiffu")
    p = load_params("params.yaml")
    assert "defectdiffu" not in p.generate.methods
    assert p.generate.method_config("defectdiffu").w_d == 2.0


# ------------------------------------------------------------------ AAL, Eq. 7-10
def test_aal_by_hand_with_both_clamps_and_the_middle():
    from defectforge.methods.defectdiffu.training import adaptive_attention_loss

    g = torch.Generator().manual_seed(4)
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, :, 0:6, 0:6] = 1  # large defect, attended: Rat < 2
    mask[1, :, 3:4, 3:4] = 1  # one pixel: Rat > 8
    mask[2, :, 2:6, 2:6] = 1  # in between
    big = torch.rand(3, 8, 8, generator=g) * 0.2 + 0.1
    big[0] += 0.8 * mask[0, 0]
    big[2] += 0.05 * mask[2, 0]
    small = torch.rand(3, 4, 4, generator=g) * 0.2 + 0.1
    eps_pred, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    alpha = 1e-3
    loss, r = adaptive_attention_loss([big, small], mask, eps_pred, eps, alpha)
    up = F.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    att = (big + up) / 2  # Eq. (7)
    rat = []
    for i in range(3):
        mk = mask[i, 0]
        rat.append(float(((1 - mk) * att[i]).sum() / ((mk * att[i]).sum() + alpha)))  # Eq. (8)
    assert rat[0] < 2 < rat[2] < 8 < rat[1]
    expected_r = [2.0, 8.0, rat[2]]  # Eq. (9)
    torch.testing.assert_close(r, torch.tensor(expected_r))
    sq = [float(((mask[i] * eps_pred[i] - mask[i] * eps[i]) ** 2).mean()) for i in range(3)]  # Eq. (10)
    assert float(loss) == pytest.approx(sum(ri * qi for ri, qi in zip(expected_r, sq)) / 3, rel=1e-5)


def test_training_step_adds_aal_on_the_defect_rows(comps):
    from defectforge.diffusion.training import disentangled_step

    x, m = _inputs(1)
    x, m = x.expand(2, -1, -1, -1).clone(), m.expand(2, -1, -1, -1).clone()
    kw = dict(outside=["bg", "bg"])
    plain = disentangled_step(comps, x, m, ["good", "defect"], "crack", torch.Generator().manual_seed(0), **kw)
    out = disentangled_step(comps, x, m, ["good", "defect"], "crack", torch.Generator().manual_seed(0), hooks=[AdaptiveAttention()], **kw)
    assert float(out["aal"].detach()) > 0
    torch.testing.assert_close(out["loss"], plain["loss"] + out["aal"])
    # by hand: the step's draws (t, eps), the oracle's share of the defect row (16x16 and 8x8 "layers"), Eq. 7-10
    from defectforge.methods.defectdiffu.training import AAL_RANGE

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, comps.scheduler.config.num_train_timesteps, (2,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    a = comps.scheduler.alphas_cumprod[t[1]]
    z_t = a.sqrt() * x[1:2] + (1 - a).sqrt() * eps[1:2]  # Eq. (6): the C_1 row is noised everywhere
    ctx, kinds = _ctx(comps, "defect", "bg")
    v_def = comps.unet.v(comps.prompts.embed("defect", "crack")[None])[:, 0]
    share = torch.sigmoid(torch.tanh(z_t.mean(1)) + 2 * v_def).detach()
    att = (share + F.interpolate(F.avg_pool2d(share[:, None], 2), size=(R, R), mode="bilinear", align_corners=False)[:, 0]) / 2
    mk = m[1, 0]
    rat = float(((1 - mk) * att[0]).sum() / ((mk * att[0]).sum() + 1e-3))
    r_hand = min(max(rat, AAL_RANGE[0]), AAL_RANGE[1])
    e_pred = comps.unet.eps(z_t, t[1:2], ctx, kinds, m[1:2]).detach()
    expected = r_hand * float(((m[1:2] * e_pred - m[1:2] * eps[1:2]) ** 2).mean())
    assert float(out["aal"].detach()) == pytest.approx(expected, rel=1e-4)
    # no defect row, no AAL term
    none = disentangled_step(comps, x, m, ["good", "good"], "crack", torch.Generator().manual_seed(0), hooks=[AdaptiveAttention()], **kw)
    assert float(none["aal"].detach()) == 0.0


def test_pretrained_profile_offline_uses_the_empty_prompt_as_null(tmp_path):
    """The pretrained path (a test-size Stable Diffusion directory with its CLIP text encoder):
    the null condition is the empty prompt; the sample changes only inside the target mask and
    its mask lies inside it."""
    from defectforge.diffusion import build_tiny_latent_model
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig

    d = build_tiny_latent_model(tmp_path / "sd")
    comps = load_pipeline_components(d, "cpu")
    assert comps.profile == "pretrained"
    null = comps.prompts.embed("null")
    assert not torch.equal(null, comps.prompts.embed("bg"))
    ids = comps.prompts.tokenizer("", padding="max_length", max_length=comps.prompts.tokenizer.model_max_length, return_tensors="pt").input_ids
    torch.testing.assert_close(null, comps.prompts.text_encoder(ids)[0][0])
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 80 + 90).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:36, 18:40] = True
    method = DefectDiffu.from_pretrained(comps, DefectDiffuConfig(steps=3, device="cpu", feather=0.0))
    res = method.generate(img, mask, "crack", seed=0)
    np.testing.assert_array_equal(res.image[~mask], img[~mask])
    assert not np.array_equal(res.image[mask], img[mask])
    assert res.mask.any() and not (res.mask & ~mask).any()
    assert method.own_mask and method.mask_origin_of(res) == res.metadata["mask_origin"]
    assert not DefectDiffu.from_pretrained(comps, DefectDiffuConfig(mask_source="target")).own_mask



# ------------------------------------------------------------------ prompts (Sec. 3.2, supplementary Tab. 2)
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A test-size Stable Diffusion directory (CLIP tokenizer and text encoder)."""
    from defectforge.diffusion import build_tiny_latent_model

    return build_tiny_latent_model(tmp_path_factory.mktemp("sd") / "model")


def _encoder(sd_dir, product):
    from defectforge.diffusion.models import load_pipeline_components

    enc = load_pipeline_components(sd_dir, "cpu").prompts
    enc.product = product
    return enc


def _clip(enc, text):
    ids = enc.tokenizer(text, padding="max_length", max_length=enc.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    with torch.no_grad():
        return enc.text_encoder(ids)[0][0]


def test_pretrained_prompts_are_the_papers_templates_with_the_dataset_names(sd_dir):
    """c_p = "A photo of {product name}", c_d = "A photo of {defect name}", c_f = "A photo of
    {defect name} {product name}" with the category as the product, the defect type as the defect."""
    enc = _encoder(sd_dir, "magnetic-tile")
    assert enc.text("bg") == "A photo of magnetic tile"  # c_p
    assert enc.text("defect", "Blowhole") == "A photo of blowhole"  # c_d
    assert enc.fusion_text("defect", "Blowhole", "bg") == "A photo of blowhole magnetic tile"  # c_f
    assert enc.text("good") == "A photo of good"  # c_g: Algorithm 1's defect name "good"
    assert enc.fusion_text("good", None, "bg") == "A photo of good magnetic tile"
    assert enc.fusion_text("defect", "Blowhole", "null") == "A photo of blowhole"  # null product: c_d alone
    assert enc.text("null") == ""
    # the contexts carry the text encoder's embeddings of exactly those sentences, not of "background"
    ctx, kinds = build_context(enc, "defect", "Blowhole", "bg")
    torch.testing.assert_close(ctx[0, kinds], _clip(enc, "A photo of blowhole"))
    torch.testing.assert_close(ctx[0, ~kinds], _clip(enc, "A photo of magnetic tile"))
    assert (ctx[0, ~kinds] - _clip(enc, "background")).abs().max() > 1e-3
    # another category, another c_p; no category: the generic product name
    assert _encoder(sd_dir, "metal_nut").text("bg") == "A photo of metal nut"
    assert _encoder(sd_dir, None).text("bg") == "A photo of product"


@pytest.mark.parametrize("product, raw, unified", [
    ("screw", "scratch_neck", "scratch"), ("screw", "thread_top", "thread"), ("leather", "glue", "liquid"),
    ("leather", "poke", "hole"), ("capsule", "poke", "hole"), ("cable", "missing_wire", "missing"),
    ("cable", "poke_insulation", "hole"), ("cable", "bent_wire", "bent"), ("zipper", "fabric_border", "cut"),
    ("zipper", "squeezed_teeth", "squeeze"), ("zipper", "split_teeth", "split"), ("tile", "gray_stroke", "color"),
    ("tile", "oil", "liquid"), ("tile", "glue_strip", "glue strip"), ("bottle", "broken_large", "broken"),
    ("toothbrush", "defective", "bent"), ("transistor", "cut_lead", "cut"), ("grid", "glue", "liquid"),
    ("carpet", "metal_contamination", "metal contamination"), ("Metal-Nut", "Scratch", "scratch"),
    # Magnetic Tile: not in the paper's table; its names pass through cleaned (crack is a unified name)
    ("magnetic-tile", "crack", "crack"), ("magnetic-tile", "Crack", "crack"), ("magnetic-tile", "Blowhole", "blowhole"),
    ("magnetic-tile", "Break", "break"), ("magnetic-tile", "broken_small", "broken"), (None, "scratch_neck", "scratch"),
    (None, "fray_edge", "fray edge"),
])
def test_defect_names_go_through_the_unification_table(product, raw, unified):
    from defectforge.diffusion.prompts import defect_name

    assert defect_name(raw, product) == unified


def test_unification_table_is_the_papers(sd_dir):
    """Supplementary Tab. 2: the 15 MVTec AD products and their 73 defect types; no raw name
    is unified two ways; the table reaches the prompt."""
    from defectforge.diffusion.prompts import DEFECT_NAME_UNIFICATION

    assert sorted(DEFECT_NAME_UNIFICATION) == sorted(
        ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper"])
    assert sum(len(v) for v in DEFECT_NAME_UNIFICATION.values()) == 73
    assert len(DEFECT_NAME_UNIFICATION["pill"]) == 7 and len(DEFECT_NAME_UNIFICATION["cable"]) == 8
    renamed = {(p, d) for p, rows in DEFECT_NAME_UNIFICATION.items() for d, u in rows.items() if d != u}
    assert len(renamed) == 26
    assert _encoder(sd_dir, "screw").text("defect", "scratch_head") == "A photo of scratch"


def test_finetune_and_generation_build_the_same_named_prompts(sd_dir, tmp_path, monkeypatch):
    """The category given to finetune is stored with the fine-tune, so the prompts DefectDiffu's
    sampler builds on the loaded model are the ones the model was trained with."""
    import json

    from defectforge.diffusion.models import FINETUNE_FILE, load_pipeline_components
    from defectforge.diffusion.prompts import TextPromptEncoder
    from defectforge.diffusion.training import finetune
    from defectforge.methods.defectdiffu import contexts

    seen = []
    encode = TextPromptEncoder._encode
    monkeypatch.setattr(TextPromptEncoder, "_encode", lambda self, prompt: (seen.append(prompt), encode(self, prompt))[1])
    rng = np.random.default_rng(0)
    img = rng.integers(80, 160, (64, 64, 3), dtype=np.uint8)
    m = np.zeros((64, 64), bool)
    m[20:40, 16:44] = True
    img[m] = 30
    finetune(str(sd_dir), [(img, m)], "Blowhole", tmp_path / "ft", normals=[rng.integers(80, 160, (64, 64, 3), dtype=np.uint8)],
             mode="lora", steps=1, batch_size=2, progress=False, device="cpu", category="magnetic-tile")
    trained = set(seen)
    assert json.loads((tmp_path / "ft" / FINETUNE_FILE).read_text())["category"] == "magnetic-tile"
    seen.clear()
    ft = load_pipeline_components(tmp_path / "ft", "cpu")
    contexts(ft, "Blowhole")  # the three conditions of Eq. 4
    generated = set(seen)
    c_p, c_d, c_g = "A photo of magnetic tile", "A photo of blowhole", "A photo of good"
    assert generated == {c_g, c_p, c_d, ""}
    assert {c_p, c_d, c_g} <= trained  # the prior rows train c_g, the defect rows c_d, both under c_p
    assert "background" not in trained | generated


def test_finetune_stage_gives_finetune_the_category(monkeypatch, tmp_path):
    """The finetune stage names the product: each (category, defect type) job passes its category."""
    import defectforge.diffusion as diffusion
    from defectforge.params.finetune import FinetuneParams
    from defectforge.pipeline import finetune as stage

    got = {}
    monkeypatch.setattr(diffusion, "finetune", lambda *a, **kw: got.update(kw) or {})
    monkeypatch.setattr(stage, "read_image", lambda path: np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(stage, "read_mask", lambda path: np.ones((8, 8), bool))
    stage._train_one(FinetuneParams(), "base", tmp_path, tmp_path, "magnetic-tile", "Blowhole", [("i.png", "m.png")], [], False, False)
    assert got["category"] == "magnetic-tile"


# ------------------------------------------------------------------ Eq. 12 (zero-shot)
def test_eq12_zero_shot_product_terms_from_the_target_defect_direction_from_the_source(comps):
    from defectforge.diffusion.ddim import zero_shot_guidance
    from defectforge.methods.defectdiffu import sample_double_free

    source = _comps()  # another fine-tune: its own token directions
    source.unet.P = torch.randn(source.unet.P.shape, generator=torch.Generator().manual_seed(9))
    z0, m = _inputs(2)
    steps, w_p, w_d = 4, 1.1, 2.2
    got = sample_double_free(comps, z0, m, "crack", steps, w_p, w_d, torch.Generator().manual_seed(3), source=source)
    g = torch.Generator().manual_seed(3)
    sched = _schedule(comps.scheduler, steps)
    z = sched[0][1] ** 0.5 * z0 + (1 - sched[0][1]) ** 0.5 * torch.randn(z0.shape, generator=g)
    for t, a, a_prev in sched:
        e_t_g0 = _oracle(comps, z, t, "good", "null", m)  # eps_T(x_t, t, c_g, 0)
        e_t_gp = _oracle(comps, z, t, "good", "bg", m)  # eps_T(x_t, t, c_g, c_T)
        e_s_g0 = _oracle(source, z, t, "good", "null", m)  # eps_S(x_t, t, c_g, 0)
        e_s_d0 = _oracle(source, z, t, "defect", "null", m)  # eps_S(x_t, t, c_d^s, 0)
        e = e_t_g0 + w_p * (e_t_gp - e_t_g0) + w_d * (e_s_d0 - e_s_g0)  # Eq. (12)
        z = _ddim(z, e, a, a_prev)
        z = m * z + (1 - m) * (a_prev**0.5 * z0 + (1 - a_prev) ** 0.5 * torch.randn(z0.shape, generator=g))
    torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
    # the source matters, and with one model for both Eq. 12 is Eq. 4
    same = sample_double_free(comps, z0, m, "crack", steps, w_p, w_d, torch.Generator().manual_seed(3), source=comps)
    plain = sample_double_free(comps, z0, m, "crack", steps, w_p, w_d, torch.Generator().manual_seed(3))
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    a, b, c = (torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(zero_shot_guidance(a, b, a, c, w_p, w_d), double_free(a, b, c, w_p, w_d))


def test_zero_shot_method_paints_the_source_defect_on_the_target(comps):
    source = _comps()
    source.unet.P = torch.randn(source.unet.P.shape, generator=torch.Generator().manual_seed(9))
    img, mask = _image()
    method = _method(comps, real_range=False)
    out = method.zero_shot(img, mask, "crack", seed=1, target=comps, source=source)
    plain = method.generate(img, mask, "crack", seed=1)
    assert (out.image[~mask] == img[~mask]).all()  # the target's background stays
    assert not np.array_equal(out.image[mask], plain.image[mask])  # the defect direction is the source's
    assert out.metadata["zero_shot"]["equation"] == 12
