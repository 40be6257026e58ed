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
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class AttentionStore:
    """Collects cross-attention maps of selected batch rows across steps and layers.

    ``rows``: which rows of the UNet batch to keep (e.g. the defect branch only).
    ``active``: set False to skip steps (e.g. only the last half of sampling).
    """

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


class AttentionShareCollector:
    """Training-time collector: the inside tokens' joint-softmax share with gradient.

    ``rows``: which rows of the UNet batch the attention loss applies to (e.g. the
    defect rows of C_1). Pass as ``attention_store`` (``cross_attention_kwargs``); the
    processor calls :meth:`add_share` once per cross-attention layer.
    """

    with_grad = True

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


def adaptive_weight_map(y: torch.Tensor, x0_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (AnomalyDiffusion): w_m = ||m||_1 Softmax(f(||m y - m x^_0||_2^2)), per batch row.

    ``y``, ``x0_hat``: (B, C, H, W) normal sample and clean estimate; ``m``: (B or 1, 1, H, W)
    mask in {0, 1}. The squared norm is per pixel over the channels, the softmax over the
    H*W pixels; f(x) = 1/x for x != 0 and -inf for x = 0, so every pixel with zero
    difference (all of them outside m) gets weight 0. Returns (B, 1, H, W). A row whose
    difference is zero everywhere (empty mask, or x^_0 = y on the whole mask) has no
    finite f: its weights are all 0 (||m||_1 * 0), so re-weighting removes that row's
    cross-attention rather than inventing a distribution the equation does not define.
    """
    m = m.to(y.dtype).expand(y.shape[0], 1, -1, -1)
    d = ((m * y - m * x0_hat) ** 2).sum(dim=1, keepdim=True)  # ||m*y - m*x^_0||_2^2 per pixel
    flat = d.flatten(1)
    nz = flat != 0
    f = torch.where(nz, 1.0 / torch.where(nz, flat, torch.ones_like(flat)), torch.full_like(flat, float("-inf")))
    soft = torch.softmax(f, dim=1)
    soft = torch.where(nz.any(dim=1, keepdim=True), soft, torch.zeros_like(soft))  # all -inf: no weight
    w = m.flatten(1).sum(dim=1, keepdim=True) * soft  # ||m||_1 * Softmax(...)
    return w.view_as(d)


@dataclass
class AttentionReweight:
    """Adaptive attention re-weighting (AnomalyDiffusion Eq. 7-8) for ``cross_attention_kwargs``.

    ``weights``: w_m (B or 1, 1, H, W) from :func:`adaptive_weight_map`, at any resolution
    whose aspect matches the layers' query grids; ``tokens``: (L,) or (B, L) bool, the
    context tokens whose attention columns are multiplied by w_m (None: all tokens).
    """

    weights: torch.Tensor
    tokens: torch.Tensor | None = None

    def column_weights(self, n_query: int, batch: int, n_tokens: int, device) -> torch.Tensor:
        """(B, 1, N, L): w_m' on the re-weighted columns, 1 on the others."""
        w, _, _ = _resize_region(self.weights.to(device), n_query, batch)  # area average, (B, N, 1)
        w = w[:, None]  # (B, 1, N, 1)
        if self.tokens is None:
            return w.expand(-1, -1, -1, n_tokens)
        tok = self.tokens.to(device).bool()
        if tok.ndim == 1:
            tok = tok[None].expand(batch, -1)
        if tok.shape[-1] != n_tokens:
            raise ValueError(f"reweight.tokens has {tok.shape[-1]} entries, the context has {n_tokens} tokens")
        tok = tok[:, None, None, :]  # (B, 1, 1, L)
        return torch.where(tok, w, torch.ones_like(w))


def _resize_region(region_mask: torch.Tensor, n_query: int, batch: int) -> tuple[torch.Tensor, int, int]:
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


class MaskedCrossAttnProcessor:
    """Attention processor for every attention layer of the UNet.

    Self-attention (no encoder states) is standard scaled-dot-product attention. For
    cross-attention, keyword arguments arrive through ``cross_attention_kwargs``:
    ``region_mask`` (B, 1, H, W) float in [0, 1], ``token_kinds`` (L,) or (B, L) bool,
    ``attention_store`` (AttentionStore or None), ``reweight`` (:class:`AttentionReweight`
    or None: AnomalyDiffusion's m'_c = m_c * w_m, Eq. 7-8).
    """

    def __init__(self, name: str = ""):
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        token_kinds: torch.Tensor | None = None,
        attention_store: AttentionStore | AttentionShareCollector | None = None,
        reweight: AttentionReweight | None = None,
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

        if is_cross and reweight is not None:
            out = self._reweighted(attn, q, k, v, batch, region_mask, token_kinds, reweight, attention_mask)
        elif not is_cross or region_mask is None or token_kinds is None:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            n_query = q.shape[2]
            m, _, _ = _resize_region(region_mask.to(q.device), n_query, batch)  # m' (B, N, 1)
            m = m[:, None]  # (B, 1, N, 1)
            inside = token_kinds.to(q.device).bool()
            if inside.ndim == 1:
                inside = inside[None].expand(batch, -1)
            inside = inside[:, None, None, :]  # (B, 1, 1, L)
            scores = (q @ k.transpose(-1, -2)) * attn.scale  # Q K^T / tau, (B, h, N, L)
            neg = torch.finfo(scores.dtype).min
            m_in = torch.softmax(scores.masked_fill(~inside, neg), dim=-1)  # M_def (or M_m)
            m_bg = torch.softmax(scores.masked_fill(inside, neg), dim=-1)  # M_bg
            # Eq. 10 / 11: m' (M_in V_in) + (1 - m') (M_bg V_bg)
            out = m * (m_in @ v) + (1.0 - m) * (m_bg @ v)
            if getattr(attention_store, "with_grad", False):
                # training: the joint share with its gradient, for the attention loss
                share = (torch.softmax(scores, dim=-1) * inside).sum(-1).mean(1)  # (B, N)
                attention_store.add_share(self.name, share, m[:, 0, :, 0])
            elif attention_store is not None:
                with torch.no_grad():
                    joint = torch.softmax(scores, dim=-1)
                    share = (joint * inside).sum(-1).mean(1)  # inside-token share of the joint softmax
                    used = (m * m_in * inside).sum(-1).mean(1)  # weights Eq. 10 actually puts on them
                    h0, w0 = region_mask.shape[-2:]
                    s = math.sqrt(h0 * w0 / n_query)
                    h, w = round(h0 / s), round(w0 / s)
                    attention_store.add(self.name, share.view(batch, h, w), used.view(batch, h, w))

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


    @staticmethod
    def _reweighted(attn, q, k, v, batch, region_mask, token_kinds, reweight: AttentionReweight, attention_mask):
        """RW-Attn(Q, K, V) = (m_c * w_m) V (AnomalyDiffusion Eq. 8 and text).

        m_c = Softmax(Q K^T / sqrt(d)) (plain cross-attention), or with ``region_mask`` and
        ``token_kinds`` the Eq. 10-11 matrix m' M_in + (1 - m') M_bg.
        """
        if attention_mask is not None:
            raise ValueError("attention re-weighting does not take an attention_mask")
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (B, h, N, L)
        n_query, n_tokens = q.shape[2], k.shape[2]
        if region_mask is None or token_kinds is None:
            m_c = torch.softmax(scores, dim=-1)
        else:
            m, _, _ = _resize_region(region_mask.to(q.device), n_query, batch)
            m = m[:, None]
            inside = token_kinds.to(q.device).bool()
            if inside.ndim == 1:
                inside = inside[None].expand(batch, -1)
            inside = inside[:, None, None, :]
            neg = torch.finfo(scores.dtype).min
            m_c = m * torch.softmax(scores.masked_fill(~inside, neg), dim=-1) + (1.0 - m) * torch.softmax(
                scores.masked_fill(inside, neg), dim=-1)
        w = reweight.column_weights(n_query, batch, n_tokens, q.device).to(m_c.dtype)
        return (m_c * w) @ v  # m'_c V


def install_masked_attention(unet) -> None:
    """Put a :class:`MaskedCrossAttnProcessor` on every attention layer of ``unet``.

    Undo with ``unet.set_attn_processor(AttnProcessor2_0())`` (``set_default_attn_processor``
    raises once custom processors are set).
    """
    unet.set_attn_processor({name: MaskedCrossAttnProcessor(name) for name in unet.attn_processors})
