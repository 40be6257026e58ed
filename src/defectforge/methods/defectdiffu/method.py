"""DefectDiffu, the generation method: Few-shot Defect Image Generation based on Consistency Modeling (DefectDiffu).

Seed paper: ../shared/seeds/defectdiffu-consistency-modeling.txt. The package, part by part:

=============  ==========================================================================
module         what
=============  ==========================================================================
``training``   the fine-tune's DefectDiffu parts, plugged into the shared training step as
               a :class:`~defectforge.diffusion.training.TrainingHook`: Algorithm 1
               (double-free condition dropout; ``finetune.cond_dropout_product`` = p_1,
               ``finetune.cond_dropout_defect`` = p_2, > 0 trains the null tokens), the
               adaptive attention-enhanced loss (Eq. 7-10, ``finetune.aal``), the mask
               module's loss (Eq. 6, 11, ``finetune.mask_module``) and TDIA (``finetune.tdia``)
``sampler``    double-free guidance (Sec. 3.3, Eq. 4), zero-shot (Eq. 12), the mask threshold
``method``     :class:`DefectDiffu`, the generation method (this docstring's steps)
=============  ==========================================================================

The mask generation module G (Eq. 6, ``mask_module``) and TDIA's attention processor
(``attention``) live in this package; the model loader restores them with a fine-tuned checkpoint
through the parts ``attention`` registers (:func:`defectforge.diffusion.models.register_finetune_part`).

Notation:

    x, m            normal image crop and target mask (pixels; m also at latent size)
    z_0 = E(x)      its latent (the pixels themselves for the tiny profile)
    c_d, c_g        defect condition: the defect type's tokens C_def, or "good" C_good
    c_p, 0          product condition C_bg, or the null condition (learned null tokens on
                    the tiny profile, the empty prompt on the pretrained one)
    w_p, w_d        product (background) and defect perturbation scales

Steps of :meth:`DefectDiffu.generate`:

1. Crop around the target mask at the model's resolution (or the whole image).
2. Start from the noised normal latent, z_T = sqrt(a_T) z_0 + sqrt(1 - a_T) eps (Eq. 1 of DDIM).
3. Every DDIM step evaluates the three conditions in one batched UNet call and combines
   them with double-free guidance, Eq. (4) (:func:`~defectforge.diffusion.ddim.double_free`):
       eps = eps(c_g, 0) + w_p (eps(c_g, c_p) - eps(c_g, 0)) + w_d (eps(c_d, 0) - eps(c_g, 0))
   then z_{t-1} = DDIM(z_t, eps), and outside m the latent is reset to the normal latent
   noised to the new level (as blended latent diffusion does), so the generated defect
   sits inside the target mask and the background stays the input's.
4. The defect tokens' cross-attention (row eps(c_d, 0), their share of the joint softmax,
   Eq. 5) is averaged over layers and over the last ``attention_fraction`` of the steps
   (the paper averages M_pre^t over the last 100 time steps).
5. Decode and paste the (feathered) mask pixels back into the image.
6. Mask: the averaged attention inside the target mask is binarised with the iterative
   threshold (:func:`iterative_threshold`). The paper only says "an iterative method";
   the classic one is Ridler and Calvard's (1978, "isodata"): start at the mean, then
   T <- (mean of values > T + mean of values <= T) / 2 until T moves less than
   ``threshold_tol``. Only pixels of the target mask are thresholded (nothing is
   generated outside it). ``mask_source="target"`` keeps the target mask instead.

   ``mask_source="module"`` (the paper's mask branch, Sec. 3.4): the mask generation
   module G (Eq. 6, :mod:`defectforge.methods.defectdiffu.mask_module`, trained by
   ``finetune.mask_module`` = lambda of Eq. 11) maps the per-token attention maps of
   each captured step to M_pre^t = D(G(A^t)); M_pre = mean_t M_pre^t, binarised inside
   the target mask by the same iterative threshold.

``generate_batch`` (samples of one defect type) puts every sample's three Eq. (4) rows into
one UNet call per step (:func:`sample_double_free_batch`, sample-major); the attention stores
keep each sample's eps(c_d, 0) row, so steps 4-6 read sample k's maps (and M_pre) from row k
and threshold them inside its own target mask.

TDIA (Sec. 3.2, ``finetune.tdia``): the paper splits a DiT into background / defect /
fusion blocks with the prompts c_p, c_d and c_f = "A photo of {defect} {product}". Here
the UNet's cross-attention layers, in forward order, are cut into those three parts
(:func:`defectforge.methods.defectdiffu.attention.tdia_parts`), and every condition pair (c_d, c_p)
of Eq. 4 becomes the context [c_d, c_p, c_f(c_d, c_p)] (the fusion prompt of the pair:
with the null condition it is the defect prompt alone). A TDIA model has no joint
softmax over [c_d, c_p], so its masks come from the module (``mask_source: module``) or
the target. Without TDIA the masked cross-attention of the inversion method (c_d / c_g
tokens inside m, c_p / 0 outside) is the spatial disentanglement.

Zero-shot (Sec. 3.6, Eq. 12, :meth:`DefectDiffu.zero_shot`): the paper's one
multi-product model becomes two fine-tunes of the same base, since checkpoints here are
per (category, defect type): the target category's model gives eps_T(c_g, 0) and
eps_T(c_g, c_T), the source category's model the defect direction
eps_S(c_d, 0) - eps_S(c_g, 0) (:func:`~defectforge.diffusion.ddim.zero_shot_guidance`).
It is a library call and a benchmark (bench/zero_shot.py), not a generate-stage option.

Realism options shared with the other diffusion methods (x0^ bound, grey steps, chroma
bound, feathered blending): see :mod:`defectforge.methods.inversion`.
"""

from __future__ import annotations

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionStore, StoreGroup, TokenMapStore
from defectforge.diffusion.ddim import chroma_range
from defectforge.diffusion.sampling import attention_to_image, is_gray, paste_back, soft_masks, to_uint8
from defectforge.errors import ParamsError
from defectforge.methods.base import BatchItem, DiffusionMethod, GenerationResult
from defectforge.methods.defectdiffu.attention import uses_tdia  # noqa: F401 - also registers how its fine-tunes load
from defectforge.methods.defectdiffu.mask_module import predicted_mask
from defectforge.methods.defectdiffu.sampler import DoubleFreeRow, attention_mask, sample_double_free_batch
from defectforge.methods.defectdiffu.config import DefectDiffuConfig


class DefectDiffu(DiffusionMethod):
    """DefectDiffu's double-free generation with attention masks (see module docstring)."""

    name = "defectdiffu"
    config_class = DefectDiffuConfig

    def __init__(self, config: DefectDiffuConfig | None = None, checkpoint=None):
        super().__init__(config or DefectDiffuConfig(), checkpoint)
        self.own_mask = self.config.mask_source in ("attention", "module")

    def mask_origin_of(self, result: GenerationResult) -> str:
        return result.metadata["mask_origin"]

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type, every sample's Eq. (4) rows in one UNet call per step
        (:func:`sample_double_free_batch`); each sample's attention and mask are read from its own rows."""
        self._require_models()
        return self._generate(self.models.get(items[0].defect), items)

    def zero_shot(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int, *, target, source) -> GenerationResult:
        """Sec. 3.6: ``defect`` (learned by the components ``source`` on another category) painted on
        ``image`` of the category the components ``target`` know, by Eq. (12). No real defect of the
        target category is used; the x0^ range bound, when on, is the one :meth:`prepare` read for
        ``defect`` (call it with the source category's real defects, or switch ``real_range`` off)."""
        return self._generate(target, [BatchItem(image, mask, defect, seed)], source=source)[0]

    def _generate(self, comps, items: list[BatchItem], source=None) -> list[GenerationResult]:
        cfg = self.config
        defect = items[0].defect
        pixel = not comps.has_decoder
        reader = source if source is not None else comps  # the model whose defect-token attention gives the mask
        if cfg.mask_source == "module" and reader.mask_module is None:
            raise ParamsError(f"generate.defectdiffu.mask_source: module needs a fine-tune with finetune.mask_module > 0 "
                              f"({reader.source} has no mask generation module)")
        if cfg.mask_source == "attention" and reader.tdia:
            raise ParamsError("generate.defectdiffu.mask_source: attention reads the joint softmax over [c_d, c_p], which a TDIA "
                              f"model ({reader.source}) does not have; use module (finetune.mask_module > 0) or target")
        rows, prepared = [], []
        for it in items:
            target, gen, crop = self._crop(comps, it)  # 1.
            with torch.no_grad():
                z0 = comps.encode(crop.x)
            m = comps.latent_mask(crop.m)
            gray = is_gray(it.image)
            soft, alpha = soft_masks(comps, crop, target, cfg.feather)
            bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
            rows.append(DoubleFreeRow(z0, m, gen, bound=bound, gray=cfg.gray_steps and gray and pixel, soft=soft if cfg.feather > 0 else None,
                                      chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None))
            prepared.append((it, target, crop, gray, alpha, bound))
        share_store = None if reader.tdia else AttentionStore()
        token_store = TokenMapStore() if cfg.mask_source == "module" else None
        store = StoreGroup(share_store, token_store)  # row k of each member: sample k (sample_double_free_batch sets the rows)
        zs = sample_double_free_batch(comps, rows, defect, cfg.steps, cfg.w_p, cfg.w_d, store, cfg.attention_fraction, source=source)  # 2.-4.
        m_pres = maps = None
        if token_store is not None:  # M_pre = mean_t D(G(A^t)) (Sec. 3.4), one per sample
            m_pres = predicted_mask(reader, reader.mask_module, token_store.captured()).cpu()
        elif share_store is not None:
            maps = share_store.mean_map((comps.resolution, comps.resolution))
        return [self._finish(comps, z, k, prep, m_pres, maps, reader, source) for k, (z, prep) in enumerate(zip(zs, prepared))]

    def _finish(self, comps, z: torch.Tensor, k: int, prep: tuple, m_pres, maps, reader, source) -> GenerationResult:
        """Steps 5-6 of sample k: decode, paste back, its attention (row k of the stores) and its mask."""
        cfg = self.config
        it, target, crop, gray, alpha, bound = prep
        defect = it.defect
        with torch.no_grad():
            generated = to_uint8(comps.decode(z), gray)
        out = paste_back(it.image, generated, crop.box, only=target, alpha=alpha if cfg.feather > 0 else None)  # 5.
        if m_pres is not None:  # sample k's M_pre, resized to the crop's pixels
            m_pre = m_pres[k]
            if tuple(m_pre.shape) != (comps.resolution, comps.resolution):
                m_pre = torch.nn.functional.interpolate(m_pre[None, None], size=(comps.resolution,) * 2, mode="bilinear")[0, 0]
            att = m_pre * crop.m[0, 0].cpu()
        elif maps is not None:
            att = maps[k] * crop.m[0, 0].cpu()
        else:  # a TDIA model with mask_source: target: no attention read-out
            att = torch.zeros_like(crop.m[0, 0].cpu())
        attention = attention_to_image(att, target, crop.box)
        extra = {"w_p": cfg.w_p, "w_d": cfg.w_d, "tdia": reader.tdia, **self.bound_metadata(defect, bound)}
        if source is not None:
            extra["zero_shot"] = {"equation": 12, "source_checkpoint": source.checkpoint_sha256(), "target_checkpoint": comps.checkpoint_sha256()}
        if cfg.mask_source in ("attention", "module"):  # 6.
            out_mask, t = attention_mask(attention, target, cfg)
            extra["mask_threshold"] = t
            extra["mask_origin"] = f"defectdiffu-{cfg.mask_source}"
            if not out_mask.any():  # nothing above the threshold: keep the target mask, and say so
                out_mask = target
                extra["mask_origin"] = f"defectdiffu-{cfg.mask_source}-empty-target"
        else:
            out_mask = target
            extra["mask_origin"] = None
        return GenerationResult(image=out, mask=out_mask, attention=attention,
                                metadata=self._metadata(comps, crop, defect, it.seed, gray, **extra))
