"""Few-shot Defect Image Generation based on Consistency Modeling (DefectDiffu).

Seed paper: ../shared/seeds/defectdiffu-consistency-modeling.txt. Training side:
Algorithm 1 (double-free condition dropout) in :func:`defectforge.diffusion.training.double_free_dropout`
(``finetune.cond_dropout_product`` = p_1, ``finetune.cond_dropout_defect`` = p_2; > 0 is
needed here: it trains the null tokens) and the adaptive attention-enhanced loss, Eq. (7)-(10),
in :func:`defectforge.diffusion.training.adaptive_attention_loss` (``finetune.aal``); this
file is the generation (Sec. 3.3, Eq. 4) and the mask branch's read-out (Sec. 3.4).

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

What of the paper is not here (said in metadata as well): TDIA (DiT split into
background / defect / fusion blocks, each with its own prompt; the UNets here are not
split, and the masked cross-attention of the inversion method plays the role of
spatial disentanglement: c_d / c_g tokens inside m, c_p / 0 outside), the fusion
prompt c_f, and the learned mask-generation module and its loss (Eq. 6; the mask is read
from attention instead).

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

from defectforge.config import DefectDiffuConfig
from defectforge.diffusion.attention import AttentionStore
from defectforge.diffusion.ddim import add_noise, bound_eps, chroma_range, ddim_schedule, ddim_step, double_free, zero_shot_guidance
from defectforge.diffusion.prompts import build_context
from defectforge.diffusion.sampling import attention_to_image, check_inputs, is_gray, make_crop, paste_back, soft_masks, to_uint8
from defectforge.methods.base import DiffusionMethod, GenerationResult

# the three conditions of Eq. 4, in the order of the batched UNet call: (defect condition, product condition)
CONDITIONS = (("good", "null"), ("good", "bg"), ("defect", "null"))
DEFECT_ROW = 2  # eps(c_d, 0): the row whose defect-token attention gives the mask
# zero-shot (Eq. 12): the target model's two product terms, the source model's two defect-direction terms
ZERO_SHOT_TARGET = (("good", "null"), ("good", "bg"))
ZERO_SHOT_SOURCE = (("good", "null"), ("defect", "null"))
ZERO_SHOT_DEFECT_ROW = 1  # eps_S(c_d, 0) in the source call: its defect-token attention gives the mask


def iterative_threshold(values: np.ndarray, tol: float = 1e-4, max_iter: int = 1000) -> float:
    """Ridler-Calvard iterative threshold of ``values`` (see module docstring, step 6)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("iterative_threshold: no values")
    t = float(v.mean())
    for _ in range(max_iter):
        hi, lo = v[v > t], v[v <= t]
        if hi.size == 0 or lo.size == 0:
            return t
        new = 0.5 * (float(hi.mean()) + float(lo.mean()))
        if abs(new - t) < tol:
            return new
        t = new
    return t


def contexts(comps, defect: str | None, conditions=CONDITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts of ``conditions`` (default :data:`CONDITIONS`): (n, L, D) and token kinds (n, L)."""
    built = [build_context(comps.prompts, d, defect if d == "defect" else None, p) for d, p in conditions]
    return torch.cat([c for c, _ in built]).to(comps.device), torch.stack([k for _, k in built]).to(comps.device)


@torch.no_grad()
def sample_double_free(comps, z0: torch.Tensor, m: torch.Tensor, defect: str, steps: int, w_p: float, w_d: float,
                       generator: torch.Generator, store: AttentionStore | None = None, attention_fraction: float = 0.1, *,
                       bound: float | tuple = 0.0, gray: bool = False, soft: torch.Tensor | None = None,
                       chroma: tuple | None = None, source=None) -> torch.Tensor:
    """Steps 2-4: DDIM with Eq. (4) inside m, the noised normal latent outside; returns z_0.

    Random draws from ``generator``, in order: z_T's noise, then one eps' per step for the
    background. ``soft`` replaces m in the background reset (the UNet's mask stays binary).
    ``store`` records the cross-attention of the eps(c_d, 0) row over the last
    ``attention_fraction`` of the steps (at least the last step).

    ``source`` (zero-shot, Eq. 12): the components that learned ``defect`` on another
    category; ``comps`` then only gives the target product's terms eps_T(c_g, 0) and
    eps_T(c_g, c_T), and ``source`` the defect direction eps_S(c_d, 0) - eps_S(c_g, 0).
    """
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    ms = m if soft is None else soft
    ctx, kinds = contexts(comps, defect) if source is None else contexts(comps, None, ZERO_SHOT_TARGET)
    n = ctx.shape[0]
    if source is not None:
        if source.resolution != comps.resolution or source.latent_channels != comps.latent_channels:
            raise ValueError("zero-shot: the source and target models must be fine-tunes of the same base (resolution, latent channels)")
        s_ctx, s_kinds = contexts(source, defect, ZERO_SHOT_SOURCE)
    if store is not None:
        store.rows = [DEFECT_ROW] if source is None else [ZERO_SHOT_DEFECT_ROW]
    sched = ddim_schedule(comps.scheduler, steps)
    first_captured = min(len(sched) - 1, int(round((1 - attention_fraction) * len(sched))))  # at least the last step
    z = add_noise(z0, noise, sched[0].alpha_t)
    for i, st in enumerate(sched):
        if store is not None:
            store.active = i >= first_captured
        if source is None:
            eps = comps.eps(z.expand(n, -1, -1, -1), st.t, ctx, kinds, m.expand(n, -1, -1, -1),
                            cond_image=z0.expand(n, -1, -1, -1), store=store)
            e = double_free(eps[0:1], eps[1:2], eps[2:3], w_p, w_d)  # Eq. (4)
        else:
            e_t = comps.eps(z.expand(2, -1, -1, -1), st.t, ctx, kinds, m.expand(2, -1, -1, -1), cond_image=z0.expand(2, -1, -1, -1))
            e_s = source.eps(z.expand(2, -1, -1, -1), st.t, s_ctx, s_kinds, m.expand(2, -1, -1, -1),
                             cond_image=z0.expand(2, -1, -1, -1), store=store)
            e = zero_shot_guidance(e_t[0:1], e_t[1:2], e_s[0:1], e_s[1:2], w_p, w_d)  # Eq. (12)
        e = bound_eps(z, e, st.alpha_t, bound, gray, chroma)
        z = ddim_step(z, e, st.alpha_t, st.alpha_prev)
        step_noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
        z = ms * z + (1 - ms) * add_noise(z0, step_noise, st.alpha_prev)  # background: the input's
    return z


def attention_mask(attention: np.ndarray, target: np.ndarray, cfg: DefectDiffuConfig) -> tuple[np.ndarray, float]:
    """Step 6: (binary mask inside ``target``, threshold) from the averaged attention."""
    values = attention[target]
    t = iterative_threshold(values, cfg.threshold_tol) if cfg.threshold == "iterative" else cfg.threshold_value
    return (attention > t) & target, float(t)


class DefectDiffu(DiffusionMethod):
    """DefectDiffu's double-free generation with attention masks (see module docstring)."""

    name = "defectdiffu"
    config_class = DefectDiffuConfig

    def __init__(self, config: DefectDiffuConfig | None = None, checkpoint=None):
        super().__init__(config or DefectDiffuConfig(), checkpoint)
        self.own_mask = self.config.mask_source == "attention"

    def mask_origin_of(self, result: GenerationResult) -> str:
        return result.metadata["mask_origin"]

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        self._require_models()
        return self._generate(self.models.get(defect), image, mask, defect, seed)

    def zero_shot(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int, *, target, source) -> GenerationResult:
        """Sec. 3.6: ``defect`` (learned by the components ``source`` on another category) painted on
        ``image`` of the category the components ``target`` know, by Eq. (12). No real defect of the
        target category is used; the x0^ range bound, when on, is the one :meth:`prepare` read for
        ``defect`` (call it with the source category's real defects, or switch ``real_range`` off)."""
        return self._generate(target, image, mask, defect, seed, source=source)

    def _generate(self, comps, image: np.ndarray, mask: np.ndarray, defect: str, seed: int, source=None) -> GenerationResult:
        check_inputs(image, mask)
        target = mask.astype(bool)
        cfg = self.config
        gen = torch.Generator().manual_seed(int(seed))
        crop = make_crop(comps, image, target, cfg.crop, cfg.context)  # 1.
        with torch.no_grad():
            z0 = comps.encode(crop.x)
        m = comps.latent_mask(crop.m)
        gray = is_gray(image)
        pixel = not comps.has_decoder
        soft, alpha = soft_masks(comps, crop, target, cfg.feather)
        bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
        store = AttentionStore()
        z = sample_double_free(comps, z0, m, defect, cfg.steps, cfg.w_p, cfg.w_d, gen, store, cfg.attention_fraction,  # 2.-4.
                               bound=bound, gray=cfg.gray_steps and gray and pixel, soft=soft if cfg.feather > 0 else None,
                               chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None, source=source)
        with torch.no_grad():
            generated = to_uint8(comps.decode(z), gray)
        out = paste_back(image, generated, crop.box, only=target, alpha=alpha if cfg.feather > 0 else None)  # 5.
        att = store.mean_map((comps.resolution, comps.resolution))[0] * crop.m[0, 0].cpu()
        attention = attention_to_image(att, target, crop.box)
        extra = {"w_p": cfg.w_p, "w_d": cfg.w_d, **self.bound_metadata(defect, bound),
                 "not_implemented": ["TDIA", "fusion prompt c_f", "mask generation module (Eq. 6)"]}
        if source is not None:
            extra["zero_shot"] = {"equation": 12, "source_checkpoint": source.checkpoint_sha256(), "target_checkpoint": comps.checkpoint_sha256()}
        if cfg.mask_source == "attention":  # 6.
            out_mask, t = attention_mask(attention, target, cfg)
            extra["mask_threshold"] = t
            extra["mask_origin"] = "defectdiffu-attention"
            if not out_mask.any():  # nothing above the threshold: keep the target mask, and say so
                out_mask = target
                extra["mask_origin"] = "defectdiffu-attention-empty-target"
        else:
            out_mask = target
            extra["mask_origin"] = None
        return GenerationResult(image=out, mask=out_mask, attention=attention,
                                metadata=self._metadata(comps, crop, defect, seed, gray, **extra))
