"""Masked cross-attention (Eq. 10-11) and the captured defect-token maps."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from defectforge.diffusion import AttentionStore


def _cross_attn_module(unet):
    name = next(n for n in unet.attn_processors if n.endswith("attn2.processor"))
    module = unet.get_submodule(name.rsplit(".processor", 1)[0])
    return module, module.processor


def test_defect_tokens_only_reach_pixels_inside_the_mask(tiny):
    attn, proc = _cross_attn_module(tiny.unet)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 16 * 16, attn.to_q.in_features, generator=g)
    tiny.prompts.add_defect("crack")
    ctx, kinds = tiny.context("defect", "crack")
    region = torch.zeros(1, 1, 64, 64)
    region[..., 16:40, 8:32] = 1  # aligned to the 16x16 grid (4 px cells)
    store = AttentionStore()
    out = proc(attn, h, ctx, region_mask=region, token_kinds=kinds, attention_store=store)
    # change the defect tokens only: the output may change inside the mask, never outside
    ctx2 = ctx.clone()
    ctx2[:, kinds] += 3.0 * torch.randn(ctx2[:, kinds].shape, generator=g)
    out2 = proc(attn, h, ctx2, region_mask=region, token_kinds=kinds)
    inside = torch.nn.functional.interpolate(region, size=(16, 16), mode="area").flatten() > 0
    diff = (out - out2).abs().amax(-1)[0]
    assert diff[~inside].max() == 0
    assert diff[inside].min() > 0
    # the captured weights actually put on defect tokens are zero outside the mask, one inside
    used = store.effective[proc.name][0][0].flatten()
    assert used[~inside].max() == 0
    torch.testing.assert_close(used[inside], torch.ones(int(inside.sum())))
    joint = store.joint[proc.name][0]
    assert joint.shape == (1, 16, 16) and 0 <= joint.min() and joint.max() <= 1


def test_without_region_mask_it_is_plain_attention(tiny):
    attn, proc = _cross_attn_module(tiny.unet)
    h = torch.randn(2, 8 * 8, attn.to_q.in_features)
    ctx = torch.randn(2, 8, 64)
    torch.testing.assert_close(proc(attn, h, ctx), AttnProcessor2_0()(attn, h, ctx), atol=1e-5, rtol=1e-4)


def test_unet_captures_maps_at_the_cross_attention_resolutions(tiny):
    """Through the full UNet: maps come from the 16x16 and 8x8 levels of a 64 px crop."""
    ctx, kinds = tiny.context("mask")
    region = torch.zeros(1, 1, 64, 64)
    region[..., 20:44, 20:44] = 1
    store = AttentionStore()
    with torch.no_grad():
        tiny.eps(torch.randn(1, 3, 64, 64), 500, ctx, kinds, region, cond_image=torch.zeros(1, 3, 64, 64), store=store)
    shapes = {tuple(v[0].shape[-2:]) for v in store.joint.values()}
    assert shapes == {(16, 16), (8, 8)}
    mean = store.mean_map((64, 64), which="effective")[0]
    assert mean[:8, :8].max() == 0 and mean[28:36, 28:36].min() > 0.99


def _eq10_by_hand(attn, h, ctx, region, kinds):
    """Eq. 10-11 written out: two softmaxes over the inside / outside token columns, blended by m'."""
    b, n, _ = h.shape
    q = attn.to_q(h).view(b, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(ctx).view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)
    v = attn.to_v(ctx).view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)
    side = int(n ** 0.5)
    m = torch.nn.functional.interpolate(region, size=(side, side), mode="area").flatten(2).transpose(1, 2)[:, None]  # (B, 1, N, 1)
    s = (q @ k.transpose(-1, -2)) * attn.scale
    inside = kinds[None, None, None, :]
    m_in = torch.softmax(s.masked_fill(~inside, float("-inf")), -1)
    m_bg = torch.softmax(s.masked_fill(inside, float("-inf")), -1)
    out = m * (m_in @ v) + (1 - m) * (m_bg @ v)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


def test_masked_attention_is_eq10_written_out_with_its_gradient(tiny):
    """A soft region mask, scores as large as a trained model's (|QK^T / tau| up to ~40), forward and backward."""
    attn, proc = _cross_attn_module(tiny.unet)
    g = torch.Generator().manual_seed(1)
    tiny.prompts.add_defect("crack")
    ctx, kinds = tiny.context("defect", "crack")
    ctx = (ctx * 8.0).detach()  # sharpens the scores: the per-group shift must keep both softmaxes finite
    region = torch.rand(2, 1, 64, 64, generator=g)
    h1 = torch.randn(2, 16 * 16, attn.to_q.in_features, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    ctx2 = ctx.expand(2, -1, -1)
    got = proc(attn, h1, ctx2, region_mask=region, token_kinds=kinds)
    want = _eq10_by_hand(attn, h2, ctx2, region, kinds)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    w = torch.randn(got.shape, generator=g)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)


def test_masked_attention_runs_in_bf16_with_a_float32_mask(tiny):
    """Mixed precision: the layer in bf16, the region mask as the samplers make it (float32)."""
    import copy

    attn, proc = _cross_attn_module(tiny.unet)
    g = torch.Generator().manual_seed(2)
    tiny.prompts.add_defect("crack")
    ctx, kinds = tiny.context("defect", "crack")
    region = torch.rand(1, 1, 64, 64, generator=g)
    h = torch.randn(1, 16 * 16, attn.to_q.in_features, generator=g)
    want = proc(attn, h, ctx, region_mask=region, token_kinds=kinds)
    half = copy.deepcopy(attn).to(torch.bfloat16)
    got = proc(half, h.bfloat16(), ctx.bfloat16(), region_mask=region, token_kinds=kinds)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_stores_follow_one_protocol_and_a_group_hands_each_record_to_every_member(tiny):
    """A processor asks a store what it records by the protocol's flags: a group of a maps store
    and a token-map store gets both records, each member the one it takes; a share collector in
    the group turns the maps record into the share with its gradient (training)."""
    from defectforge.diffusion.attention import (
        AttentionShareCollector,
        AttentionStoreProtocol,
        BaseStore,
        StoreGroup,
        TokenMapStore,
    )

    for store in (AttentionStore(), TokenMapStore(), AttentionShareCollector([0]), StoreGroup(), BaseStore()):
        assert isinstance(store, AttentionStoreProtocol)
    attn, proc = _cross_attn_module(tiny.unet)
    h = torch.randn(1, 16 * 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    tiny.prompts.add_defect("crack")
    ctx, kinds = tiny.context("defect", "crack")
    region = torch.zeros(1, 1, 64, 64)
    region[..., 16:40, 8:32] = 1
    maps, tokens = AttentionStore(), TokenMapStore()
    group = StoreGroup(maps, None, tokens)
    assert group.members() == [maps, tokens] and group.records_maps and group.records_tokens and not group.records_share
    proc(attn, h, ctx, region_mask=region, token_kinds=kinds, attention_store=group)
    assert len(maps) == 1 and list(tokens.steps[-1]) == [proc.name]
    assert tokens.steps[-1][proc.name].shape == (1, int(kinds.sum()), 16, 16)
    # the inside tokens' per-token maps sum to the share the maps store recorded
    torch.testing.assert_close(tokens.steps[-1][proc.name].sum(1), maps.joint[proc.name][0], atol=1e-6, rtol=1e-5)
    share = AttentionShareCollector([0])
    proc(attn, h, ctx, region_mask=region, token_kinds=kinds, attention_store=StoreGroup(AttentionStore(), share))
    assert len(share.shares) == 1 and share.shares[0].requires_grad is torch.is_grad_enabled()
