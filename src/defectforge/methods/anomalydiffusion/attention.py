"""AnomalyDiffusion's adaptive attention re-weighting (Eq. 7-8) and the mask dilation of the
authors' sampler (see the package docstring for where they depart from the paper's text).

    r(t)     = (t + 100) * 8 / 1000 latent pixels on a 32-px latent     (:func:`reweight_dilation_radius`)
    w_m      = Eq. 7 as the authors compute it, in [1, w_max]            (:func:`adaptive_weight_map`)
    m'_c     = Softmax(w_m * Q K^T / sqrt(d)) on the anomaly tokens      (Eq. 8, :class:`ReweightedAttnProcessor`)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defectforge.diffusion.attention import MaskedCrossAttnProcessor, resize_region


def reweight_dilation_radius(t: int, width: int, per_1000: float = 8.0) -> int:
    """Radius (latent pixels) by which the mask is dilated at timestep ``t`` before Eq. 1 and Eq. 7.

    The authors' sampler (sjtuplayer/anomalydiffusion, ``ldm/models/diffusion/ddim.py``,
    ``ddim_sampling`` with ``adaptive_mask``) dilates m by ``(t + 100) * 8 // 1000`` latent
    pixels at their default 200 DDIM steps (``* 16`` at 50 steps) on a 32 x 32 latent: 8 px at
    t = 900, 0 px below t = 25. The radius is scaled here to the latent's width so the share of
    the crop it covers does not depend on the model's resolution.
    """
    return int((int(t) + 100) * per_1000 * width / 32.0 // 1000)


def dilate_mask(m: torch.Tensor, radius: int) -> torch.Tensor:
    """Square (Chebyshev) dilation of a (B, 1, H, W) mask by ``radius`` pixels (max pooling;
    the authors' ``Dilation2d`` is the same max over a (2r + 1)^2 window)."""
    if radius <= 0:
        return m
    return F.max_pool2d(m, kernel_size=2 * radius + 1, stride=1, padding=radius)


def adaptive_weight_map(z_t: torch.Tensor, z0: torch.Tensor, m: torch.Tensor, w_max: float = 1.5) -> torch.Tensor:
    """Eq. 7 (AnomalyDiffusion) as the authors' code computes it; (B, 1, H, W).

    The paper writes w_m = ||m||_1 Softmax(f(||m y - m x^_0||_2^2)) with f(x) = 1/x. Applied
    literally, the softmax of 1/d over a few hundred in-mask pixels with realistic distances
    (d ~ 0.003 to 0.3) puts a weight of ~||m||_1 on one pixel and ~0 on all others: the
    anomaly tokens are switched off almost everywhere in the mask. The authors' sampler
    (``ldm/models/diffusion/ddim.py``, ``ddim_sampling``, "replace the softmax") does instead,
    per batch row, with m the *dilated* mask (:func:`dilate_mask`) and distances in latent space:

        d   = mean_c (m (z_t - z_0))^2                 z_t the current sample, z_0 = Enc(y)
        w   = ||m||_1 (m / d) / sum(m / d)             linear normalisation of f(d) = 1/d
        w_m = clamp(w, 1, w_max) inside m, 1 outside   (w_max = 1.5)

    so the weights stay in [1, 1.5]: in-mask pixels whose sample is still close to the normal
    image (small d: the least noticeable ones) get their anomaly-token attention amplified up
    to 1.5x, none is switched off. Where this departs from the authors' code: a pixel with
    d = 0 exactly (they map it to -1 before 1/d, which lowers the normaliser) is left out of
    the normaliser and gets weight 1; a row with no positive d gets 1 everywhere, as theirs.
    """
    m = m.to(z_t.dtype).expand(z_t.shape[0], 1, -1, -1)
    d = ((m * (z_t - z0)) ** 2).mean(dim=1, keepdim=True)  # mean over latent channels, as the authors
    pos = (m > 0) & (d > 0)
    inv = torch.where(pos, m / torch.where(pos, d, torch.ones_like(d)), torch.zeros_like(d))
    total = inv.flatten(1).sum(1).view(-1, 1, 1, 1)
    area = m.flatten(1).sum(1).view(-1, 1, 1, 1)
    w = area * inv / total.clamp_min(torch.finfo(inv.dtype).tiny)
    w = torch.where(pos, w.clamp(1.0, w_max), torch.ones_like(w))  # 1 outside m and where d = 0
    return torch.where(total > 0, w, torch.ones_like(w))


@dataclass
class AttentionReweight:
    """Adaptive attention re-weighting (AnomalyDiffusion Eq. 7-8) for ``cross_attention_kwargs``.

    ``weights``: w_m (B or 1, 1, H, W) from :func:`adaptive_weight_map`, at any resolution
    whose aspect matches the layers' query grids (area-averaged to each grid); ``tokens``:
    (L,) or (B, L) bool, the context tokens (the anomaly embedding's) whose attention logits
    are multiplied by w_m (None: all tokens).
    """

    weights: torch.Tensor
    tokens: torch.Tensor | None = None

    def column_weights(self, n_query: int, batch: int, n_tokens: int, device) -> torch.Tensor:
        """(B, 1, N, L): w_m' on the re-weighted columns, 1 on the others."""
        w, _, _ = resize_region(self.weights.to(device), n_query, batch)  # area average, (B, N, 1)
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


class ReweightedAttnProcessor(MaskedCrossAttnProcessor):
    """A cross-attention layer under AnomalyDiffusion's re-weighting: given ``reweight`` (an
    :class:`AttentionReweight`), RW-Attn of Eq. 8; without it, a :class:`MaskedCrossAttnProcessor`."""

    def attend(self, attn, q, k, v, batch, is_cross, *, attention_mask, region_mask, token_kinds, attention_store, reweight):
        """RW-Attn(Q, K, V) (AnomalyDiffusion Eq. 8) as the authors' code applies it.

        The paper writes m'_c = m_c * w_m on the attention map m_c = Softmax(Q K^T / sqrt(d)).
        The authors' ``CrossAttention.forward`` (``ldm/modules/attention.py``) multiplies the
        *logits* of the anomaly tokens' columns by w_m and takes the softmax after:
        m'_c = Softmax(w_m * Q K^T / sqrt(d)) on those columns, 1 on the others. That is what
        is done here: with w_m in [1, 1.5] it sharpens the anomaly tokens' attention where w_m
        > 1 and leaves every row a distribution (the post-softmax product would not sum to 1).
        With ``region_mask`` and ``token_kinds`` the re-weighted logits go through the Eq. 10-11
        routing m' M_in + (1 - m') M_bg instead of one softmax.
        """
        if not is_cross or reweight is None:
            return super().attend(attn, q, k, v, batch, is_cross, attention_mask=attention_mask, region_mask=region_mask,
                                  token_kinds=token_kinds, attention_store=attention_store, reweight=None)
        if attention_mask is not None:
            raise ValueError("attention re-weighting does not take an attention_mask")
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # Q K^T / sqrt(d), (B, h, N, L)
        n_query, n_tokens = q.shape[2], k.shape[2]
        w = reweight.column_weights(n_query, batch, n_tokens, q.device).to(scores.dtype)  # (B, 1, N, L)
        scores = scores * w  # Eq. 8 as in the authors' code: w_m on the logits
        if region_mask is None or token_kinds is None:
            m_c = torch.softmax(scores, dim=-1)
        else:
            m, _, _ = resize_region(region_mask.to(q.device), n_query, batch)
            m = m[:, None].to(scores.dtype)
            inside = token_kinds.to(q.device).bool()
            if inside.ndim == 1:
                inside = inside[None].expand(batch, -1)
            inside = inside[:, None, None, :]
            neg = torch.finfo(scores.dtype).min
            m_c = m * torch.softmax(scores.masked_fill(~inside, neg), dim=-1) + (1.0 - m) * torch.softmax(
                scores.masked_fill(inside, neg), dim=-1)
        return m_c @ v  # m'_c V


def install_reweighting(unet) -> None:
    """Put a :class:`ReweightedAttnProcessor` on every cross-attention layer (``attn2``) of ``unet``
    that has a :class:`MaskedCrossAttnProcessor` (self-attention keeps its processor); idempotent."""
    procs = dict(unet.attn_processors)
    if all(isinstance(p, ReweightedAttnProcessor) for n, p in procs.items() if ".attn2." in f".{n}"):
        return
    unet.set_attn_processor({n: ReweightedAttnProcessor(n) if ".attn2." in f".{n}" and type(p) is MaskedCrossAttnProcessor else p
                             for n, p in procs.items()})
