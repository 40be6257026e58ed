"""AnomalyDiffusion's adaptive attention re-weighting (Eq. 7-8) as the authors' code runs it,
recomputed by hand.

Eq. 7 (authors' linear form): d = mean_c (m (z_t - z_0))^2, w = ||m||_1 (m / d) / sum(m / d),
w_m = clamp(w, 1, 1.5) inside m, 1 outside. Eq. 8 (authors' code): the anomaly tokens'
attention logits are multiplied by w_m, softmax after.

The collapse test uses in-mask distances recorded from a real sampler run on Magnetic
Tile (``REAL_D`` below), the range in which the paper's literal softmax(1/d) puts all the
weight on one pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from defectforge.methods.anomalydiffusion.attention import (
    AttentionReweight,
    ReweightedAttnProcessor,
    adaptive_weight_map,
    install_reweighting,
    dilate_mask,
    reweight_dilation_radius,
)

torch.set_num_threads(1)


def _case():
    # 2x2 latent, 2 channels; mask covers pixels 0, 1, 3 (row-major)
    m = torch.tensor([[1.0, 1.0], [0.0, 1.0]])[None, None]
    z0 = torch.zeros(1, 2, 2, 2)
    zt = torch.zeros(1, 2, 2, 2)
    zt[0, 0] = torch.tensor([[0.1, 0.0], [5.0, 0.4]])  # channel 0
    zt[0, 1] = torch.tensor([[0.3, 0.2], [5.0, 0.0]])  # channel 1
    # per-pixel mean squared differences inside m: p0 = 0.05, p1 = 0.02, p3 = 0.08; p2 is outside m
    return zt, z0, m


def _hand_weights(w_max=1.5):
    d = {0: 0.05, 1: 0.02, 3: 0.08}
    inv = {k: 1 / v for k, v in d.items()}
    z = sum(inv.values())
    w = [1.0] * 4  # outside m: 1
    for k, v in inv.items():
        w[k] = min(max(3.0 * v / z, 1.0), w_max)  # ||m||_1 = 3; clamp to [1, w_max]
    return np.array(w)


def test_eq7_authors_linear_form_by_hand():
    zt, z0, m = _case()
    w = adaptive_weight_map(zt, z0, m)
    assert w.shape == (1, 1, 2, 2)
    want = _hand_weights()
    # 3 * 50 / (20 + 50 + 12.5) = 1.818 -> 1.5; 3 * 20 / 82.5 = 0.727 -> 1; 3 * 12.5 / 82.5 = 0.455 -> 1
    np.testing.assert_allclose(want, [1.0, 1.5, 1.0, 1.0])
    np.testing.assert_allclose(w.flatten().numpy(), want, rtol=1e-6)
    # a wider clamp shows the unclamped linear weight of the closest pixel
    np.testing.assert_allclose(adaptive_weight_map(zt, z0, m, w_max=3.0).flatten().numpy(), [1.0, 3 * 50 / 82.5, 1.0, 1.0], rtol=1e-6)


def test_eq7_zero_difference_everywhere_gives_unit_weights():
    zt, _, m = _case()
    w = adaptive_weight_map(zt, zt.clone(), m)
    assert torch.equal(w, torch.ones_like(w))


# In-mask distances d = mean_c (z_t - z_0)^2 recorded on Magnetic Tile (pixel-space tiny
# profile fine-tuned with the anomaly embedding, 30 DDIM steps, 6 samples per type;
# experiments/methods-as-authors-run-them/reweight_distances.py and reweight-distances.json beside it): the 5th / 25th / 50th /
# 75th / 95th percentile over the dilated masks at a step (0 = noisiest of 30).
REAL_D = {
    "blowhole step 0": [0.1364, 0.4597, 0.916, 1.572, 3.051],
    "blowhole step 20": [0.1009, 0.3474, 0.6812, 1.282, 2.545],
    "crack step 28": [0.03694, 0.2243, 0.4503, 0.7652, 1.384],
    "break step 29": [0.004048, 0.08705, 0.3069, 0.7992, 1.459],
}


def _realistic_d(rng: np.random.Generator, q: list[float], n: int = 400) -> np.ndarray:
    """n distances whose percentiles (5, 25, 50, 75, 95) are ``q``: piecewise log-linear between them."""
    u = np.sort(rng.uniform(0.0, 1.0, n))
    knots = np.array([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    lq = np.log(np.array([q[0] / 1.5, *q, q[-1] * 1.5]))
    return np.exp(np.interp(u, knots, lq))


@pytest.mark.parametrize("step", sorted(REAL_D))
def test_eq7_does_not_collapse_on_real_distances(step):
    """The paper's literal softmax(1/d) on these distances puts ~||m||_1 on one pixel and ~0 on the
    rest; the authors' form keeps every in-mask pixel's weight in [1, 1.5] and spreads the boost."""
    d = torch.tensor(_realistic_d(np.random.default_rng(0), REAL_D[step]), dtype=torch.float32)
    n = d.numel()
    side = 24
    m = torch.zeros(1, 1, side, side)
    m.view(-1)[:n] = 1.0
    z0 = torch.zeros(1, 4, side, side)
    zt = torch.zeros(1, 4, side, side)
    zt.view(1, 4, -1)[:, :, :n] = d.sqrt()  # mean over the 4 channels of d = d
    w = adaptive_weight_map(zt, z0, m).view(-1)
    inside = w[:n]
    assert float(inside.min()) >= 1.0 and float(inside.max()) <= 1.5 + 1e-6
    assert torch.equal(w[n:], torch.ones(side * side - n))  # 1 outside the mask
    # no pixel is switched off and the boost is not on a handful of pixels: at least a tenth
    # of the mask is amplified (the softmax form amplifies 1-2 pixels and zeroes the rest)
    assert float((inside > 1.0 + 1e-6).float().mean()) > 0.1
    # the closer the sample to the normal image (small d), the larger the weight
    order = torch.argsort(d)
    assert float(inside[order[: n // 10]].mean()) > float(inside[order[-n // 10:]].mean())
    # and the paper's literal formula on the same distances does collapse (why the authors replaced
    # it): the 5 % closest pixels take over 95 % of the weight and the median pixel is all but
    # switched off (on the recorded runs themselves, with their full lower tails: one pixel got
    # 2049 of 2200 at blowhole step 0)
    soft = n * torch.softmax(1.0 / d.double(), dim=0)
    top = torch.sort(soft, descending=True).values
    assert float(top[: n // 20].sum()) > 0.95 * n and float(soft.median()) < 0.01


def test_dilation_radius_and_dilation():
    # (t + 100) * 8 // 1000 on a 32-px latent: 8 px at t = 900, 0 below t = 25; scaled with the width
    assert reweight_dilation_radius(900, 32) == 8
    assert reweight_dilation_radius(400, 32) == 4
    assert reweight_dilation_radius(24, 32) == 0
    assert reweight_dilation_radius(900, 64) == 16
    assert reweight_dilation_radius(900, 32, per_1000=16) == 16
    m = torch.zeros(1, 1, 9, 9)
    m[..., 4, 4] = 1
    d = dilate_mask(m, 2)
    assert d.sum() == 25 and torch.equal(d[..., 2:7, 2:7], torch.ones(1, 1, 5, 5))
    assert torch.equal(dilate_mask(m, 0), m)


def _layer():
    torch.manual_seed(3)
    attn = Attention(query_dim=4, cross_attention_dim=3, heads=1, dim_head=4)
    attn.set_processor(ReweightedAttnProcessor("t"))
    return attn.eval()


def _qkv(attn, h, e):
    Wq, Wk, Wv = (l.weight.detach().numpy() for l in (attn.to_q, attn.to_k, attn.to_v))
    Wo, bo = attn.to_out[0].weight.detach().numpy(), attn.to_out[0].bias.detach().numpy()
    hn, en = h.numpy()[0], e.numpy()[0]
    return hn @ Wq.T, en @ Wk.T, en @ Wv.T, Wo, bo


def _softmax(s):
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_eq8_logits_of_the_anomaly_tokens_are_scaled_by_hand():
    attn = _layer()
    h = torch.randn(1, 4, 4)  # 4 queries = the 2x2 grid
    e = 3 * torch.randn(1, 3, 3)  # 3 context tokens
    w = torch.tensor([[1.0, 1.5], [1.0, 1.25]])[None, None]
    tokens = torch.tensor([True, True, False])
    with torch.no_grad():
        out = attn(h, encoder_hidden_states=e, reweight=AttentionReweight(w, tokens)).numpy()[0]
        plain = attn(h, encoder_hidden_states=e).numpy()[0]
    Q, K, V, Wo, bo = _qkv(attn, h, e)
    s = Q @ K.T / math.sqrt(4)
    col = np.where(tokens.numpy()[None, :], w.flatten().numpy()[:, None], 1.0)  # (N, L)
    want = _softmax(s * col) @ V @ Wo.T + bo  # Softmax(w_m * Q K^T / sqrt(d)) V
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # every row of the re-weighted map is a distribution; w = 1 rows equal plain attention
    np.testing.assert_allclose(out[[0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[1], plain[1])
    np.testing.assert_allclose(plain, _softmax(s) @ V @ Wo.T + bo, rtol=1e-5, atol=1e-6)


def test_reweight_resizes_to_the_layer_grid_by_area():
    attn = _layer()
    h, e = torch.randn(1, 4, 4), torch.randn(1, 3, 3)
    w4 = 1 + torch.arange(16.0).view(1, 1, 4, 4) / 30  # a 4x4 map on a 2x2 query grid
    w2 = torch.nn.functional.avg_pool2d(w4, 2)
    with torch.no_grad():
        a = attn(h, encoder_hidden_states=e, reweight=AttentionReweight(w4))
        b = attn(h, encoder_hidden_states=e, reweight=AttentionReweight(w2))
    torch.testing.assert_close(a, b)


def test_wrong_token_count_is_refused():
    attn = _layer()
    with pytest.raises(ValueError, match="reweight.tokens has 2 entries, the context has 3 tokens"):
        attn(torch.randn(1, 4, 4), encoder_hidden_states=torch.randn(1, 3, 3),
             reweight=AttentionReweight(torch.ones(1, 1, 2, 2), torch.tensor([True, False])))


def test_through_the_tiny_unet_unit_weights_reproduce_eq10_11_and_weights_matter():
    """comps.eps passes ``reweight`` to every cross-attention layer; w_m = 1 leaves Eq. 10-11 as is,
    and a layer without the re-weighting processor refuses the weights instead of ignoring them."""
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("crack")
    install_reweighting(comps.unet)  # AnomalyDiffusion's processor on the cross-attention layers
    ctx, kinds = comps.context("defect", "crack")
    r = comps.resolution
    z = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, r, r)
    m[..., r // 4 : r // 2, r // 4 : 3 * r // 4] = 1
    with torch.no_grad():
        base = comps.eps(z, 500, ctx, kinds, m)
        ones = comps.eps(z, 500, ctx, kinds, m, reweight=AttentionReweight(torch.ones(1, 1, r, r)))
        w = 1 + 0.5 * m  # the largest weight the authors allow, inside m
        other = comps.eps(z, 500, ctx, kinds, m, reweight=AttentionReweight(w))
    torch.testing.assert_close(ones, base, rtol=1e-4, atol=1e-5)
    assert (other - base).abs().max() > 1e-4
    plain = build_tiny_components(seed=0)
    with pytest.raises(ValueError, match="re-weighting"), torch.no_grad():
        plain.eps(z, 500, ctx, kinds, m, reweight=AttentionReweight(w))
