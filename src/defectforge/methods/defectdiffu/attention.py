"""TDIA, DefectDiffu's text-guided disentangled integrated architecture (Sec. 3.2 of
../shared/seeds/defectdiffu-consistency-modeling.txt), as a diffusers attention processor.

The paper splits a DiT's stack of blocks into a background, a defect and a fusion part, each fed
its own prompt: c_p, c_d and the fusion prompt c_f ("A photo of {defect name} {product name}").
Here the same split is made on the UNet's cross-attention layers: :func:`tdia_parts` takes them
in the order the forward pass runs them (down, mid, up,
:func:`~defectforge.diffusion.attention.cross_attention_order`) and cuts that sequence into three
consecutive parts of (nearly) equal length, background first, then defect, then fusion. The
context is ``[c_d, c_p, c_f]`` with token kinds 1 / 0 / 2 (:data:`TOKEN_KIND`,
:func:`defectforge.diffusion.prompts.build_context` with ``fusion=True``), and a layer of part P
attends only to the tokens of its own prompt:

    Attn_P(z, C) = Softmax(Q K_P^T / tau) V_P,      K_P, V_P: the tokens of P's prompt

There is no spatial routing under TDIA (no m' in the attention): the UNet still sees m through
its inpainting channels. The mask generation module (Eq. 6,
:mod:`defectforge.methods.defectdiffu.mask_module`) reads the defect part's per-token maps
(:func:`mask_module_layers`), which a :class:`~defectforge.diffusion.attention.TokenMapStore`
collects (all cross-attention layers' inside-token columns of the joint softmax when TDIA is off).

A fine-tune folder with TDIA or a mask module (``"tdia"`` / ``"mask_module"`` in its
``defectforge_finetune.json``) loads them through the parts registered here with
:func:`defectforge.diffusion.models.register_finetune_part`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from defectforge.diffusion.attention import MaskedCrossAttnProcessor, cross_attention_order, grid_of
from defectforge.diffusion.models import register_finetune_part

# token kinds of a TDIA context [c_d, c_p, c_f]: which prompt each token belongs to
TOKEN_KIND = {"defect": 1, "background": 0, "fusion": 2}
TDIA_PARTS = ("background", "defect", "fusion")


def tdia_parts(unet) -> dict[str, str]:
    """TDIA's split: the cross-attention layers in forward order, cut into three consecutive
    parts (background, defect, fusion) of sizes differing by at most one (the last the largest)."""
    names = cross_attention_order(unet)
    n = len(names)
    if n < 3:
        raise ValueError(f"TDIA needs at least 3 cross-attention layers, this UNet has {n}")
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    out, i = {}, 0
    for part, size in zip(TDIA_PARTS, sizes):
        for name in names[i:i + size]:
            out[name] = part
        i += size
    return out


class TDIAAttnProcessor(MaskedCrossAttnProcessor):
    """A cross-attention layer of TDIA part ``part`` (DefectDiffu Sec. 3.2): with token kinds it
    attends only to its part's prompt, Attn_P(z, C) = Softmax(Q K_P^T / tau) V_P; the defect
    part hands its per-token maps to a store that records them (the mask module's input).
    Without token kinds it is a :class:`MaskedCrossAttnProcessor`."""

    def __init__(self, name: str = "", part: str = "defect"):
        super().__init__(name)
        if part not in TDIA_PARTS:
            raise ValueError(f"TDIA part must be one of {TDIA_PARTS}, got {part!r}")
        self.part = part

    def attend(self, attn, q, k, v, batch, is_cross, *, attention_mask, region_mask, token_kinds, attention_store, reweight):
        if not is_cross or token_kinds is None:
            return super().attend(attn, q, k, v, batch, is_cross, attention_mask=attention_mask, region_mask=region_mask,
                                  token_kinds=token_kinds, attention_store=attention_store, reweight=reweight)
        if reweight is not None:
            raise ValueError("attention re-weighting (AnomalyDiffusion) is not defined for a TDIA model")
        kinds = token_kinds.to(q.device).long()
        if kinds.ndim == 1:
            kinds = kinds[None].expand(batch, -1)
        own = kinds == TOKEN_KIND[self.part]  # (B, L)
        if not bool(own.any(dim=1).all()):
            raise ValueError(f"TDIA layer {self.name} ({self.part} part): the context has no {self.part} tokens "
                             "(build it with build_context(..., fusion=True))")
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (B, h, N, L)
        p = torch.softmax(scores.masked_fill(~own[:, None, None, :], torch.finfo(scores.dtype).min), dim=-1)
        if attention_store is not None and attention_store.records_tokens and self.part == "defect":
            n_query = q.shape[2]
            side = math.isqrt(n_query)
            h, w = grid_of(region_mask, n_query) if region_mask is not None else (side, n_query // side)
            attention_store.add_token_maps(self.name, p.mean(1)[:, :, own[0]], h, w)
        return p @ v


def install_tdia(unet) -> None:
    """A :class:`TDIAAttnProcessor` of its part (:func:`tdia_parts`) on every cross-attention layer
    of ``unet``, the plain masked processor everywhere else."""
    parts = tdia_parts(unet)
    unet.set_attn_processor({name: TDIAAttnProcessor(name, parts[name]) if name in parts else MaskedCrossAttnProcessor(name)
                             for name in unet.attn_processors})


def set_tdia(comps, on: bool = True) -> None:
    """Route ``comps``' cross-attention by TDIA part (:func:`install_tdia`), or not (the masked
    processors of every model); ``comps.tdia`` makes its contexts carry the fusion prompt."""
    comps.tdia = bool(on)
    comps.install_processors = install_tdia if comps.tdia else None
    comps.processors_on(comps.unet)


def uses_tdia(unet) -> bool:
    """Whether ``unet``'s processors route cross-attention by TDIA part."""
    return any(isinstance(p, TDIAAttnProcessor) for p in unet.attn_processors.values())


def mask_module_layers(comps) -> list[str]:
    """The cross-attention layers whose token maps the mask module reads, in forward order:
    TDIA's defect part, or every cross-attention layer without TDIA."""
    if comps.tdia:
        parts = tdia_parts(comps.unet)
        return [n for n in cross_attention_order(comps.unet) if parts[n] == "defect"]
    return cross_attention_order(comps.unet)


def _load_tdia(comps, folder: Path, device) -> list[Path]:  # noqa: ARG001 - the loaders' one signature
    set_tdia(comps, True)
    return []


def _load_mask_module(comps, folder: Path, device) -> list[Path]:
    from defectforge.methods.defectdiffu.mask_module import MASK_MODULE_DIR, MaskGenerationModule

    comps.mask_module = MaskGenerationModule.from_pretrained(folder / MASK_MODULE_DIR, device)
    return sorted((folder / MASK_MODULE_DIR).glob("*.safetensors"))


register_finetune_part("tdia", _load_tdia)
register_finetune_part("mask_module", _load_mask_module)
