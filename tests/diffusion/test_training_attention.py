"""The attention loss: it trains the defect tokens' joint-softmax share (Eq. 13's input) towards m'."""

from __future__ import annotations

import math

import pytest
import torch

from defectforge.diffusion.attention import AttentionShareCollector, AttentionStore


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    region = torch.zeros(2, 1, 64, 64)
    region[0, :, 16:40, 8:32] = 1
    region[1, :, 32:56, 24:48] = 1
    return x, region


def _shares(comps, x, region, ctx, kinds):
    """Mean share inside / outside the mask as sampling captures it for Eq. 13
    (AttentionStore, layer mean resized to the image), and the attention loss."""
    store, col = AttentionStore(), AttentionShareCollector(rows=[0, 1])
    with torch.no_grad():
        comps.eps(x, 500, ctx, kinds, region, cond_image=torch.zeros_like(x), store=store)
        comps.eps(x, 500, ctx, kinds, region, cond_image=torch.zeros_like(x), store=col)
    a = store.mean_map((64, 64))
    inside = region[:, 0] > 0.5
    return (a[inside].mean().item(), a[~inside].mean().item()), col.loss().item()


def test_attention_loss_alone_raises_the_share_inside_and_lowers_it_outside(tiny):
    tiny.prompts.add_defect("crack")
    ctx, kinds = tiny.context("defect", "crack")
    ctx = ctx.expand(2, -1, -1)
    x, region = _batch()
    (in0, out0), loss0 = _shares(tiny, x, region, ctx, kinds)
    assert abs(in0 - out0) < 0.1  # untrained: no preference for the defect tokens inside the mask
    params = list(tiny.unet.parameters()) + tiny.prompts.defect_parameters("crack")
    opt = torch.optim.Adam(params, lr=3e-3)
    tiny.unet.train()
    for _ in range(10):
        ctx, kinds = tiny.context("defect", "crack")
        col = AttentionShareCollector(rows=[0, 1])
        tiny.eps(x, 500, ctx.expand(2, -1, -1), kinds, region, cond_image=torch.zeros_like(x), store=col)
        opt.zero_grad()
        col.loss().backward()
        opt.step()
    tiny.unet.eval()
    ctx, kinds = tiny.context("defect", "crack")
    (in1, out1), loss1 = _shares(tiny, x, region, ctx.expand(2, -1, -1), kinds)
    assert loss1 < loss0
    assert in1 > in0 + 0.1 and out1 < out0 - 0.1
    assert in1 > 0.5 > out1  # Eq. 13's threshold now separates the mask from the background


def test_attention_loss_is_the_balanced_bce_by_hand():
    col = AttentionShareCollector(rows=[0])
    share = torch.tensor([[0.8, 0.6, 0.3, 0.1]])  # one row, four query pixels
    region = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    col.add_share("layer", share, region)
    inside = -(math.log(0.8) + math.log(0.6)) / 2
    outside = -(math.log(0.7) + math.log(0.9)) / 2
    assert col.loss().item() == pytest.approx(0.5 * (inside + outside), rel=1e-6)
    assert col.mean_share() == pytest.approx((0.7, 0.2))


def test_step_with_attention_loss_reports_it_and_adds_it(tiny):
    from defectforge.diffusion.training import disentangled_step

    tiny.prompts.add_defect("crack")
    x, region = _batch()
    out0 = disentangled_step(tiny, x, region, ["defect", "good"], "crack", torch.Generator().manual_seed(1))
    out1 = disentangled_step(tiny, x, region, ["defect", "good"], "crack", torch.Generator().manual_seed(1), attention_loss=0.5)
    assert "attention" not in out0 and out1["attention"] > 0
    torch.testing.assert_close(out1["loss"], out0["loss"] + 0.5 * out1["attention"])
