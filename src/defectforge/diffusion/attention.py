"""Masked cross-attention (Eq. 10-11 of the DDIM-inversion paper) as a diffusers
attention processor, with capture of the defect tokens' attention for Eq. 13.

Notation (../shared/seeds/ddim-inversion-disentangled-background.txt, Sec. 3.3):

    m'              region_mask resized to the layer's resolution (area average)
    C_1 = [C_def, C_bg]   context of the defect branch z_t
    C_2 = [C_m,   C_bg]   context of the background branch z_t^m
    token_kinds     bool per context token: True for the "inside" tokens (C_def, C_m,
                    or C_good), False for the background token(s) C_bg
    M_in, M_bg      softmax(Q K^T / tau) restricted to the inside / background tokens

    Attn^C(z_t, C_1) = m' * M_def V_def + (1 - m') * M_bg V_bg            (10)
    Attn^C(z^m_t, C_2) = m' * M_m V_m + (1 - m') * M_bg V_bg              (11)

Both equations are the same computation with different inside tokens, so one
processor serves both branches of a batched UNet call. Without ``region_mask`` the
processor is plain attention (the UNet behaves like any diffusers UNet).

Capture for Eq. 13: with an :class:`AttentionStore`, each cross-attention layer
records, per query pixel, the share of the *joint* softmax over all tokens that
goes to the inside tokens, ``sum_{k in inside} softmax(QK^T/tau)_k`` (mean over
heads). Eq. 13 thresholds this at 1/2: a pixel is kept when the model attends more
to the defect tokens than to the background token. (The paper writes
``softmax(Q K_def^T)``; a softmax over the defect tokens alone sums to one, so the
threshold only makes sense for the defect share of the joint softmax.) The store
also records the weights actually used, ``m' * M_in`` summed over inside tokens,
which is zero outside the mask by construction (tested).

Training the joint softmax. Eq. 10-11 use separate softmaxes over the inside and the
background tokens, so the diffusion loss never trains the *joint* softmax that Eq. 13
reads: left alone, the defect share stays near its initial 1/2 everywhere. With an
:class:`AttentionShareCollector` passed as ``attention_store`` during training, each
cross-attention layer hands over the same joint share *with its gradient* together
with m' at the layer's resolution, and :meth:`AttentionShareCollector.loss` turns them
into an attention loss (the training counterpart of DefectDiffu's mask prediction loss,
loss_m = ||M_f - Mask_f||^2, Eq. 6 of ../shared/seeds/defectdiffu-consistency-modeling.txt,
over the layer-averaged cross-attention of its Eq. 7, with the share itself as the mask
prediction instead of a learned decoder):

    L_attn = mean_layers mean_rows 1/2 [ sum m' (-log s) / sum m'
                                       + sum (1 - m') (-log (1 - s)) / sum (1 - m') ]

a class-balanced binary cross-entropy between the share s and m', balanced because a
2-3 % mask would otherwise be outvoted by the background (DefectDiffu's adaptive ratio,
Eq. 8-9, addresses the same imbalance).

Method-specific processors subclass :class:`MaskedCrossAttnProcessor` in their method's package:
DefectDiffu's TDIA (``defectforge.methods.defectdiffu.attention``) and AnomalyDiffusion's
re-weighting (Eq. 8, ``defectforge.methods.anomalydiffusion.attention``). A :class:`TokenMapStore`
collects the per-token maps DefectDiffu's mask module reads (all cross-attention layers'
inside-token columns of the joint softmax, or TDIA's defect part).

Processors, one per behaviour, all with the one call shape diffusers hands
``cross_attention_kwargs`` to (:class:`AttnProcessorBase`): here :class:`MaskedCrossAttnProcessor`
(plain attention, or Eq. 10-11 when a region mask and token kinds are given). Stores implement
:class:`AttentionStoreProtocol` (subclass :class:`BaseStore`); a processor asks a store what it
records through the protocol's flags, never by looking for attributes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention



def cross_attention_order(unet) -> list[str]:
    """The UNet's cross-attention processors (``attn2``) in the order its forward pass runs them."""
    group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(name: str):
        parts = name.split(".")
        return (group.get(parts[0], 3), *[int(p) for p in parts if p.isdigit()])

    return sorted((n for n in unet.attn_processors if ".attn2." in f".{n}"), key=key)


@runtime_checkable
class AttentionStoreProtocol(Protocol):
    """What a processor may hand a store (``attention_store`` of ``cross_attention_kwargs``).

    The flags say which records a store takes; a processor computes a record only when asked:

    ``records_maps``       :meth:`add`: per layer, the inside tokens' joint-softmax share and
                           the weights Eq. 10 used (no gradient; sampling, Eq. 13)
    ``records_share``      :meth:`add_share`: the same share with its gradient, and m' (training)
    ``records_tokens``     :meth:`add_token_maps`: per-token maps (DefectDiffu's mask module)
    """

    rows: list[int] | None
    active: bool
    records_maps: bool
    records_share: bool
    records_tokens: bool

    def add(self, name: str, joint: torch.Tensor, effective: torch.Tensor) -> None: ...

    def add_share(self, name: str, share: torch.Tensor, region: torch.Tensor) -> None: ...

    def add_token_maps(self, name: str, maps: torch.Tensor, h: int, w: int) -> None: ...

    def next_step(self) -> None: ...

    def members(self) -> list["AttentionStoreProtocol"]: ...


class BaseStore:
    """:class:`AttentionStoreProtocol` with every record switched off and ignored: a store
    overrides the records it takes and sets their flags."""

    rows: list[int] | None = None
    active: bool = True
    records_maps = False
    records_share = False
    records_tokens = False

    def add(self, name: str, joint: torch.Tensor, effective: torch.Tensor) -> None:
        pass

    def add_share(self, name: str, share: torch.Tensor, region: torch.Tensor) -> None:
        pass

    def add_token_maps(self, name: str, maps: torch.Tensor, h: int, w: int) -> None:
        pass

    def next_step(self) -> None:
        pass

    def members(self) -> list["AttentionStoreProtocol"]:
        """The stores behind this one (itself; a :class:`StoreGroup` its members)."""
        return [self]


class TokenMapStore(BaseStore):
    """Per-token cross-attention maps for the mask generation module (DefectDiffu Eq. 6).

    The processor calls :meth:`add_token_maps` on the layers the module reads: the defect
    part's under TDIA (softmax over c_d's tokens), every cross-attention layer otherwise
    (the inside tokens' columns of the joint softmax). ``rows``: the batch rows kept;
    ``with_grad``: keep the autograd graph (training). Maps are kept per step, in layer
    order: ``steps[k][name] = (R, L_in, h, w)``; :meth:`next_step` opens a new step.
    """

    records_tokens = True

    def __init__(self, rows: list[int] | None = None, with_grad: bool = False):
        self.rows = rows
        self.with_grad_maps = with_grad
        self.active = True
        self.steps: list[dict[str, torch.Tensor]] = [{}]

    def next_step(self) -> None:
        if self.steps[-1]:
            self.steps.append({})

    def add_token_maps(self, name: str, maps: torch.Tensor, h: int, w: int) -> None:
        """``maps``: (B, N, L_in) attention probabilities (mean over heads) of one layer."""
        if not self.active:
            return
        if self.rows is not None:
            maps = maps[self.rows]
        maps = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h, w)
        self.steps[-1][name] = maps if self.with_grad_maps else maps.detach().float().cpu()

    def captured(self) -> list[dict[str, torch.Tensor]]:
        return [s for s in self.steps if s]


class StoreGroup(BaseStore):
    """Several stores behind one ``attention_store`` keyword (e.g. the attention-loss collector
    and the mask module's token maps in one training step): a record goes to every member
    (a member that does not take it ignores it); the group takes what any member takes."""

    def __init__(self, *stores: AttentionStoreProtocol | None):
        self.stores = [s for s in stores if s is not None]
        self.records_tokens = any(s.records_tokens for s in self.stores)
        self.records_share = any(s.records_share for s in self.stores)
        self.records_maps = any(s.records_maps for s in self.stores)

    def add(self, *args) -> None:
        for s in self.stores:
            s.add(*args)

    def add_share(self, *args) -> None:
        for s in self.stores:
            s.add_share(*args)

    def add_token_maps(self, *args) -> None:
        for s in self.stores:
            s.add_token_maps(*args)

    def next_step(self) -> None:
        for s in self.stores:
            s.next_step()

    def members(self) -> list[AttentionStoreProtocol]:
        return list(self.stores)


class AttentionStore(BaseStore):
    """Collects cross-attention maps of selected batch rows across steps and layers.

    ``rows``: which rows of the UNet batch to keep (e.g. the defect branch only).
    ``active``: set False to skip steps (e.g. only the last half of sampling).
    """

    records_maps = True

    def __init__(self, rows: list[int] | None = None):
        self.rows = rows
        self.active = True
        self.joint: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.effective: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, name: str, joint: torch.Tensor, effective: torch.Tensor) -> None:
        if not self.active:
            return
        if self.rows is not None:
            joint, effective = joint[self.rows], effective[self.rows]
        self.joint[name].append(joint.detach().float().cpu())
        self.effective[name].append(effective.detach().float().cpu())

    def __len__(self) -> int:
        return sum(len(v) for v in self.joint.values())

    def mean_map(self, size: tuple[int, int], which: str = "joint") -> torch.Tensor:
        """Average over layers and steps, bilinearly resized to ``size``: (B, H, W)."""
        maps = self.joint if which == "joint" else self.effective
        if not maps:
            raise RuntimeError("no cross-attention maps were captured")
        acc = None
        n = 0
        for items in maps.values():
            for m in items:  # (B, h, w)
                up = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                acc = up if acc is None else acc + up
                n += 1
        return acc / n


class AttentionShareCollector(BaseStore):
    """Training-time collector: the inside tokens' joint-softmax share with gradient.

    ``rows``: which rows of the UNet batch the attention loss applies to (e.g. the
    defect rows of C_1). Pass as ``attention_store`` (``cross_attention_kwargs``); the
    processor calls :meth:`add_share` once per cross-attention layer.
    """

    records_share = True

    def __init__(self, rows: list[int]):
        self.rows = list(rows)
        self.shares: list[torch.Tensor] = []  # (R, N) per layer
        self.targets: list[torch.Tensor] = []  # m' (R, N) per layer

    def add_share(self, name: str, share: torch.Tensor, region: torch.Tensor) -> None:
        self.shares.append(share[self.rows].flatten(1))
        self.targets.append(region[self.rows].flatten(1).detach())

    def loss(self) -> torch.Tensor:
        """Class-balanced BCE between the share and m', averaged over layers and rows."""
        if not self.shares:
            raise RuntimeError("no cross-attention share was collected (no masked cross-attention layer ran)")
        terms = []
        for s, m in zip(self.shares, self.targets):
            s = s.float().clamp(1e-6, 1 - 1e-6)
            m = m.float()
            inside = (m * -torch.log(s)).sum(1) / m.sum(1).clamp_min(1e-6)
            outside = ((1 - m) * -torch.log1p(-s)).sum(1) / (1 - m).sum(1).clamp_min(1e-6)
            terms.append(0.5 * (inside + outside))  # (R,)
        return torch.stack(terms).mean()

    def mean_share(self) -> tuple[float, float]:
        """Mean share inside / outside m' (m' > 1/2 counts as inside), for logs and tests."""
        s = torch.cat([x.detach().flatten() for x in self.shares])
        m = torch.cat([x.flatten() for x in self.targets]) > 0.5
        return float(s[m].mean()) if m.any() else float("nan"), float(s[~m].mean()) if (~m).any() else float("nan")


def resize_region(region_mask: torch.Tensor, n_query: int, batch: int) -> tuple[torch.Tensor, int, int]:
    """Resize (B or 1, 1, H0, W0) to the layer's query grid; returns (B, N, 1), h, w."""
    h0, w0 = region_mask.shape[-2:]
    scale = math.sqrt(h0 * w0 / n_query)
    h, w = round(h0 / scale), round(w0 / scale)
    if h * w != n_query:
        raise ValueError(f"cannot match a {h0}x{w0} region mask to {n_query} attention queries")
    m = F.interpolate(region_mask.float(), size=(h, w), mode="area")
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, -1, -1, -1)
    return m.reshape(batch, h * w, 1), h, w


def grid_of(region_mask: torch.Tensor, n_query: int) -> tuple[int, int]:
    """The (h, w) query grid of a layer with ``n_query`` queries for a mask or latent of this aspect."""
    h0, w0 = region_mask.shape[-2:]
    s = math.sqrt(h0 * w0 / n_query)
    return round(h0 / s), round(w0 / s)


class AttnProcessorBase:
    """The one call shape of every defectforge attention processor (diffusers passes
    ``cross_attention_kwargs`` to a processor only as named parameters of its ``__call__``, so
    all of them name the same ones). It does what every processor does around the attention
    itself (norms, projections, heads, output projection, residual) and hands
    ``(q, k, v)`` (B, heads, N or L, d) to :meth:`attend`, which a subclass writes.

    ``cross_attention_kwargs``: ``region_mask`` (B, 1, H, W) float in [0, 1] (m'),
    ``token_kinds`` (L,) or (B, L) (bool: inside tokens; long under TDIA: ``defectforge.methods.defectdiffu.attention.TOKEN_KIND``),
    ``attention_store`` (an :class:`AttentionStoreProtocol` or None) and ``reweight``
    (AnomalyDiffusion's weights, taken only by its own processor).
    """

    def __init__(self, name: str = ""):
        self.name = name

    def attend(self, attn: Attention, q, k, v, batch: int, is_cross: bool, *, attention_mask, region_mask, token_kinds,
               attention_store: AttentionStoreProtocol | None, reweight) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        token_kinds: torch.Tensor | None = None,
        attention_store: AttentionStoreProtocol | None = None,
        reweight=None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        out = self.attend(attn, q, k, v, batch, is_cross, attention_mask=attention_mask, region_mask=region_mask,
                          token_kinds=token_kinds, attention_store=attention_store, reweight=reweight)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def plain_attention(attn: Attention, q, k, v, batch: int, attention_mask) -> torch.Tensor:
    """softmax(Q K^T / tau) V (scaled dot-product attention, with diffusers' attention mask)."""
    mask = None
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inside_columns(token_kinds: torch.Tensor, batch: int, device) -> torch.Tensor:
    """(B, 1, 1, L) bool: the inside tokens (C_def, C_m or C_good) of each row's context."""
    inside = token_kinds.to(device).bool()
    if inside.ndim == 1:
        inside = inside[None].expand(batch, -1)
    return inside[:, None, None, :]


class MaskedCrossAttnProcessor(AttnProcessorBase):
    """Self-attention and cross-attention without a region mask or token kinds: plain
    attention. Cross-attention with both: Eq. 10-11, and the records a store asks for
    (:class:`AttentionStoreProtocol`): the joint share (sampling, Eq. 13), the share with its
    gradient (the attention loss), the inside tokens' per-token maps (the mask module)."""

    def attend(self, attn, q, k, v, batch, is_cross, *, attention_mask, region_mask, token_kinds, attention_store, reweight):
        if is_cross and reweight is not None:
            raise ValueError(f"{self.name}: attention re-weighting needs AnomalyDiffusion's processor "
                             "(defectforge.methods.anomalydiffusion.attention.install_reweighting)")
        if not is_cross or region_mask is None or token_kinds is None:
            return plain_attention(attn, q, k, v, batch, attention_mask)
        n_query = q.shape[2]
        m, _, _ = resize_region(region_mask.to(q.device), n_query, batch)  # m' (B, N, 1)
        m = m[:, None]  # (B, 1, N, 1)
        inside = inside_columns(token_kinds, batch, q.device)  # (B, 1, 1, L)
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # Q K^T / tau, (B, h, N, L)
        m = m.to(scores.dtype)  # the mask is float32; the model may run in bf16 / fp16
        # M_in (M_def or M_m) and M_bg are softmaxes over the inside and the outside token columns. Both come
        # from one exp, shifted by each column group's own row max (as a softmax is), and Eq. 10 / 11,
        # m' (M_in V_in) + (1 - m') (M_bg V_bg), is one product of V with their m'-weighted sum.
        neg = torch.finfo(scores.dtype).min
        row_max = torch.where(inside, scores.masked_fill(~inside, neg).amax(-1, keepdim=True),
                              scores.masked_fill(inside, neg).amax(-1, keepdim=True))
        e = torch.exp(scores - row_max.detach())
        tiny = torch.finfo(scores.dtype).tiny
        s_in = (e * inside).sum(-1, keepdim=True).clamp_min(tiny)  # (B, h, N, 1)
        s_bg = (e * ~inside).sum(-1, keepdim=True).clamp_min(tiny)
        out = (e * torch.where(inside, m / s_in, (1.0 - m) / s_bg)) @ v  # Eq. (10) / (11)
        if attention_store is None:
            return out
        if attention_store.records_tokens:  # Eq. 6 module input: inside-token columns of the joint softmax
            h, w = grid_of(region_mask, n_query)
            joint = torch.softmax(scores, dim=-1).mean(1)  # (B, N, L)
            attention_store.add_token_maps(self.name, joint[:, :, inside[0, 0, 0]], h, w)
        if attention_store.records_share:
            # training: the joint share with its gradient, for the attention loss
            share = (torch.softmax(scores, dim=-1) * inside).sum(-1).mean(1)  # (B, N)
            attention_store.add_share(self.name, share, m[:, 0, :, 0])
        elif attention_store.records_maps:
            with torch.no_grad():
                joint = torch.softmax(scores, dim=-1)
                share = (joint * inside).sum(-1).mean(1)  # inside-token share of the joint softmax
                used = (m * (e * inside) / s_in).sum(-1).mean(1)  # weights Eq. 10 actually puts on them (m' M_in)
                h, w = grid_of(region_mask, n_query)
                attention_store.add(self.name, share.view(batch, h, w), used.view(batch, h, w))
        return out


def install_masked_attention(unet) -> None:
    """Put a :class:`MaskedCrossAttnProcessor` on every attention layer of ``unet``.

    Undo with ``unet.set_attn_processor(AttnProcessor2_0())`` (``set_default_attn_processor``
    raises once custom processors are set).
    """
    unet.set_attn_processor({name: MaskedCrossAttnProcessor(name) for name in unet.attn_processors})
