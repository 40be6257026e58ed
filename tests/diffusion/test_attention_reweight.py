"""AnomalyDiffusion's adaptive attention re-weighting (Eq. 7-8), recomputed by hand.

Eq. 7: w_m = ||m||_1 Softmax(f(||m y - m x^_0||_2^2)), f(x) = 1/x (x != 0), -inf (x = 0).
Eq. 8: m_c = Softmax(Q K^T / sqrt(d)), m'_c = m_c * w_m, RW-Attn = m'_c V.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from defectforge.diffusion.attention import AttentionReweight, MaskedCrossAttnProcessor, adaptive_weight_map

torch.set_num_threads(1)


def _case():
    # 2x2 image, 2 channels; mask covers pixels 0, 1, 3 (row-major)
    m = torch.tensor([[1.0, 1.0], [0.0, 1.0]])[None, None]
    y = torch.zeros(1, 2, 2, 2)
    x0 = torch.zeros(1, 2, 2, 2)
    x0[0, 0] = torch.tensor([[1.0, 0.0], [5.0, 0.5]])  # channel 0
    x0[0, 1] = torch.tensor([[0.0, 2.0], [5.0, 0.0]])  # channel 1
    # per-pixel squared differences inside m: p0 = 1, p1 = 4, p3 = 0.25; p2 is outside m
    return y, x0, m


def _hand_weights():
    f = [1 / 1.0, 1 / 4.0, None, 1 / 0.25]  # f(x) = 1/x; p2: m*y - m*x0 = 0 -> -inf
    e = [math.exp(v) if v is not None else 0.0 for v in f]
    z = sum(e)
    return np.array([3.0 * v / z for v in e])  # ||m||_1 = 3


def test_eq7_weight_map_by_hand():
    y, x0, m = _case()
    w = adaptive_weight_map(y, x0, m)
    assert w.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(w.flatten().numpy(), _hand_weights(), rtol=1e-6)
    # the least noticeable in-mask pixel (smallest difference) gets the largest weight, and
    # the weights inside m sum to ||m||_1
    assert int(w.flatten().argmax()) == 3 and float(w.sum()) == pytest.approx(3.0)


def test_eq7_zero_difference_everywhere_gives_no_weight():
    y, _, m = _case()
    w = adaptive_weight_map(y, y.clone(), m)
    assert torch.equal(w, torch.zeros_like(w))


def _layer():
    torch.manual_seed(3)
    attn = Attention(query_dim=4, cross_attention_dim=3, heads=1, dim_head=4)
    attn.set_processor(MaskedCrossAttnProcessor("t"))
    return attn.eval()


def test_eq8_reweighted_attention_by_hand():
    attn = _layer()
    h = torch.randn(1, 4, 4)  # 4 queries = the 2x2 grid
    e = torch.randn(1, 3, 3)  # 3 context tokens
    y, x0, m = _case()
    w = adaptive_weight_map(y, x0, m)
    with torch.no_grad():
        out = attn(h, encoder_hidden_states=e, reweight=AttentionReweight(w)).numpy()[0]
        Wq, Wk, Wv = (l.weight.numpy() for l in (attn.to_q, attn.to_k, attn.to_v))
        Wo, bo = attn.to_out[0].weight.numpy(), attn.to_out[0].bias.numpy()
    hn, en = h.numpy()[0], e.numpy()[0]
    Q, K, V = hn @ Wq.T, en @ Wk.T, en @ Wv.T  # Eq. 8
    s = Q @ K.T / math.sqrt(4)
    mc = np.exp(s - s.max(1, keepdims=True))
    mc /= mc.sum(1, keepdims=True)  # m_c
    mc2 = mc * _hand_weights()[:, None]  # m'_c = m_c * w_m (per query pixel)
    want = (mc2 @ V) @ Wo.T + bo
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # the pixel outside m gets no cross-attention at all (w_m = 0): only the output bias
    np.testing.assert_allclose(out[2], bo, atol=1e-6)


def test_eq8_only_named_tokens_are_reweighted():
    attn = _layer()
    h, e = torch.randn(1, 4, 4), torch.randn(1, 3, 3)
    y, x0, m = _case()
    w = adaptive_weight_map(y, x0, m)
    tokens = torch.tensor([True, True, False])
    with torch.no_grad():
        out = attn(h, encoder_hidden_states=e, reweight=AttentionReweight(w, tokens)).numpy()[0]
        Wq, Wk, Wv = (l.weight.numpy() for l in (attn.to_q, attn.to_k, attn.to_v))
        Wo, bo = attn.to_out[0].weight.numpy(), attn.to_out[0].bias.numpy()
        plain = attn(h, encoder_hidden_states=e).numpy()[0]
    hn, en = h.numpy()[0], e.numpy()[0]
    Q, K, V = hn @ Wq.T, en @ Wk.T, en @ Wv.T
    s = Q @ K.T / 2.0
    mc = np.exp(s - s.max(1, keepdims=True))
    mc /= mc.sum(1, keepdims=True)
    col = np.where(np.array([True, True, False])[None, :], _hand_weights()[:, None], 1.0)
    want = ((mc * col) @ V) @ Wo.T + bo
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, plain)  # re-weighting changes the output
    # without reweight the processor is plain attention
    np.testing.assert_allclose(plain, (mc @ V) @ Wo.T + bo, rtol=1e-5, atol=1e-6)


def test_reweight_resizes_to_the_layer_grid_by_area():
    attn = _layer()
    h, e = torch.randn(1, 4, 4), torch.randn(1, 3, 3)
    w4 = torch.arange(16.0).view(1, 1, 4, 4) / 8  # a 4x4 map on a 2x2 query grid
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
    """comps.eps passes ``reweight`` to every cross-attention layer; w_m = 1 leaves Eq. 10-11 as is."""
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("crack")
    ctx, kinds = comps.context("defect", "crack")
    r = comps.resolution
    z = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, r, r)
    m[..., r // 4 : r // 2, r // 4 : 3 * r // 4] = 1
    with torch.no_grad():
        base = comps.eps(z, 500, ctx, kinds, m)
        ones = comps.eps(z, 500, ctx, kinds, m, reweight=AttentionReweight(torch.ones(1, 1, r, r)))
        w = 2 * m  # doubles the attention inside m
        other = comps.eps(z, 500, ctx, kinds, m, reweight=AttentionReweight(w))
    torch.testing.assert_close(ones, base, rtol=1e-4, atol=1e-5)
    assert (other - base).abs().max() > 1e-4
