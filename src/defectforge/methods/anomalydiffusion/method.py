"""AnomalyDiffusion: Few-Shot Anomaly Image Generation with Diffusion Model (Hu et al.,
AAAI 2024; code: github.com/sjtuplayer/anomalydiffusion).

Seed: ../shared/seeds/anomalydiffusion-few-shot.txt (method section and Sec. "Experiments").

Notation (the paper's):

    y, m            the normal (anomaly-free) sample and the anomaly mask
    e_a             anomaly embedding: k learned tokens per anomaly type (appearance)
    E, e_s = E(m)   spatial encoder and spatial embedding: n tokens from the mask (location)
    e = {e_a, e_s}  spatial anomaly embedding, the text condition of the diffusion model

Training: masked textual inversion on a *frozen* base model (only e_a and E learn):

    L_dif = || m * (eps - eps_theta(z_t, t, {e_a, e_s})) ||_2^2                            (5)
    e_a*, E* = argmin_{e_a, E} E_{z ~ Enc(x_i), m_i, eps, t} L_dif                          (6)

Sampling: blended diffusion with e as the condition,

    x_{t-1} = p_theta(x_{t-1} | x_t, e) * m + q(y_{t-1} | y_0) * (1 - m)                    (1)

and, in every step, adaptive attention re-weighting (Eq. 7-8): a weight map w_m over the
mask scales the cross-attention to the anomaly tokens, more where the sample is still
close to the normal image (:mod:`defectforge.diffusion.attention`: ``adaptive_weight_map``,
``AttentionReweight``). ``reweight: false`` gives the paper's w/o-AAR ablation.

The re-weighting follows the authors' code (sjtuplayer/anomalydiffusion,
``ldm/models/diffusion/ddim.py`` ``ddim_sampling`` with ``adaptive_mask``, and
``ldm/modules/attention.py`` ``CrossAttention.forward``), not the paper's text, because the
text's formula collapses in practice: w_m = ||m||_1 Softmax(1/d) over the in-mask pixels,
with the distances a real sampler produces, gives one pixel a weight of about ||m||_1 and
every other pixel about 0, so the anomaly tokens are switched off almost everywhere in the
mask (tests/diffusion/test_attention_reweight.py shows it on distances recorded from a run
on Magnetic Tile). The authors' code, followed here:

* replaces the softmax with a linear normalisation of 1/d and clamps the weight to
  [1, 1.5] (``reweight_max``), 1 outside the mask: no token is ever switched off;
* measures d = mean_c (z_t - z_0)^2 between the current sample and the normal latent, in
  latent space, once per step before the UNet call (the text's x^_0 = D(p_theta(z^_0 | z_t))
  would cost a second UNet call per step);
* dilates the mask by r(t) = (t + 100) * 8 / 1000 latent pixels (on a 32-px latent; scaled to
  the latent's width here, ``reweight_dilation``) both for the weights and for the blending
  of Eq. 1, so the region around the defect is free to adapt at the noisy steps;
* multiplies the anomaly tokens' attention *logits* by w_m (softmax after), not the
  attention probabilities.

Where this differs from the paper, plainly:

* E is a small convolutional pyramid (three stride-2 stages) fused top-down in the
  manner of an FPN, pooled to a 4 x 4 grid per level (so the tokens keep the mask's
  location) and mapped by n fully connected heads, one token each; the paper uses
  ResNet-50 + FPN + n FC heads.
* E is trained per anomaly type together with that type's e_a (the finetune stage
  works per defect type); the paper shares one E across all types.
* The tokens e are the UNet's cross-attention context directly. On the tiny profile
  that is what every prompt is; on the pretrained (Stable Diffusion) profile the paper
  puts e_a and e_s into CLIP's token-embedding space and runs the text encoder, which
  this module does not: e lives in the UNet's context space (dimension
  ``cross_attention_dim``).
* L_dif (Eq. 5) is averaged over the masked latent entries (sum / (||m||_1 C)) instead
  of summed: the same minimiser, a step size that does not scale with the mask's area.
* Mask generation (Eq. 9) is not part of this module.

A method that has no trained embedding for a defect type refuses to run (one line
naming the missing folder): an untrained E is never used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from defectforge.diffusion.ddim import chroma_range
from defectforge.diffusion.sampling import is_gray, paste_back, soft_masks, to_uint8
from defectforge.errors import DataError, ParamsError
from defectforge.methods.anomalydiffusion.attention import install_reweighting
from defectforge.methods.anomalydiffusion.embedding import EMBEDDING_DIR, EMBEDDING_WEIGHTS, load_anomaly_embedding, spatial_anomaly_embedding
from defectforge.methods.anomalydiffusion.sampler import ADRow, sample_anomalydiffusion_batch
from defectforge.methods.base import BatchItem, DiffusionMethod, GenerationResult
from defectforge.methods.anomalydiffusion.config import AnomalyDiffusionConfig


class AnomalyDiffusion(DiffusionMethod):
    """AnomalyDiffusion (see module docstring). ``checkpoint``: a finetune folder with an
    ``anomaly_embedding/`` subfolder, or {defect type: such a folder}."""

    name = "anomalydiffusion"
    config_class = AnomalyDiffusionConfig

    def __init__(self, config: AnomalyDiffusionConfig, checkpoint=None):
        super().__init__(config, checkpoint)
        self._bases: dict[str, object] = {}
        self._embeddings: dict[tuple[str, str], tuple] = {}

    def _folder(self, defect: str) -> Path:
        self._require_models()
        ck = self.models.checkpoint
        if isinstance(ck, dict):
            if defect not in ck:
                raise DataError(f"anomalydiffusion: no checkpoint folder for defect type {defect!r} (have: {sorted(ck)})")
            ck = ck[defect]
        if not isinstance(ck, (str, os.PathLike)):
            raise ParamsError("anomalydiffusion: the checkpoint must be a finetune folder (or a {defect: folder} mapping)")
        return Path(ck) / EMBEDDING_DIR

    def _get(self, defect: str):
        """(frozen base components, e_a, E, meta, folder) for ``defect``; refuses without trained weights."""
        from defectforge.diffusion.models import load_pipeline_components

        folder = self._folder(defect)
        key = (str(folder), defect)
        if key not in self._embeddings:
            from defectforge.diffusion.models import resolve_device

            dev = resolve_device(self.config.device)
            e_a, encoder, meta, base = load_anomaly_embedding(folder, dev)
            if meta.get("defect_type") not in (None, defect):
                raise DataError(f"{folder}: anomaly embedding of {meta.get('defect_type')!r}, asked for {defect!r}")
            if str(base) not in self._bases:
                comps = load_pipeline_components(base, self.config.device, self.dtype)
                comps.unet.eval()
                install_reweighting(comps.unet)  # Eq. 8's processor on the cross-attention layers
                self._bases[str(base)] = comps
            self._embeddings[key] = (self._bases[str(base)], e_a, encoder, meta, folder)
        return self._embeddings[key]

    def checkpoint_for(self, defect: str) -> str | None:
        """SHA-256 over the frozen base's weights and the trained embedding file."""
        comps, _, _, _, folder = self._get(defect)
        h = hashlib.sha256(comps.checkpoint_sha256().encode())
        h.update((folder / EMBEDDING_WEIGHTS).read_bytes())
        return h.hexdigest()

    @property
    def checkpoint_sha256(self) -> str | None:
        return None  # per defect type: checkpoint_for

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type, one UNet row each in every step (:func:`sample_anomalydiffusion_batch`)."""
        cfg = self.config
        defect = items[0].defect
        comps, e_a, encoder, meta, folder = self._get(defect)
        pixel = not comps.has_decoder
        rows, prepared = [], []
        for it in items:
            image = it.image
            raw, gen, crop = self._crop(comps, it)
            with torch.no_grad():
                z0 = comps.encode(crop.x)
                e = spatial_anomaly_embedding(e_a, encoder, crop.m)  # e = {e_a, E(m)}
            m = comps.latent_mask(crop.m)
            gray = is_gray(image)
            soft, alpha = soft_masks(comps, crop, raw, cfg.feather)
            bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
            rows.append(ADRow(z0, m, gen, e=e, bound=bound, gray=cfg.gray_steps and gray and pixel, soft=soft if cfg.feather > 0 else None,
                              chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None))
            prepared.append((it, raw, crop, gray, alpha, bound, e))
        zs = sample_anomalydiffusion_batch(comps, rows, cfg.steps, reweight=cfg.reweight, w_max=cfg.reweight_max, dilation=cfg.reweight_dilation)
        out = []
        for z, (it, raw, crop, gray, alpha, bound, e) in zip(zs, prepared):
            with torch.no_grad():
                generated = to_uint8(comps.decode(z), gray)
            # background kept: only the (feathered) mask pixels change, as in the other methods
            image = paste_back(it.image, generated, crop.box, only=raw, alpha=alpha if cfg.feather > 0 else None)
            out.append(GenerationResult(
                image=image,
                mask=raw,
                attention=None,
                metadata=self._metadata(comps, crop, defect, it.seed, gray, **self.bound_metadata(defect, bound), reweight=cfg.reweight,
                                        reweight_max=cfg.reweight_max, reweight_dilation=cfg.reweight_dilation,
                                        anomaly_embedding={"folder": str(folder), "tokens": int(e.shape[1]),
                                                           "anomaly_tokens": int(e_a.shape[0]), "spatial_tokens": encoder.n_tokens,
                                                           "training": meta.get("metrics", {})}),
            ))
        return out
