"""AdaBLDM: A Novel Approach to Industrial Defect Generation through Blended Latent
Diffusion Model with Online Adaptation (Li et al.; code: github.com/GrandpaXun242/AdaBLDM).

Seed: ../shared/seeds/adabldm-blended-latent-diffusion.txt (abstract and figure
list; the three-stage inference of its Fig. 3 is followed here).

Notation:

    x, m            normal image crop and target mask; T the trimap (0 background,
                    1 object, 2 defect region = m on the object)
    m_d             defect region (T == 2), in pixels and at latent size
    z_0 = E(x)      latent of the normal crop (pixels for the tiny profile)
    z_t             the sample being denoised; z_0^bg(t) = sqrt(a_t) z_0 + sqrt(1 - a_t) eps
    C_1, C_good     [C_def, C_bg], [C_good, C_bg] with masked cross-attention over m_d
    w_d             ``guidance`` (DefectDiffu Eq. 4)

Steps of :meth:`BlendedMethod.generate`:

1. Trimap: object foreground estimate (:func:`defectforge.masks.foreground.estimate_foreground`);
   the defect region is the target mask on the object, so defects are not placed
   off the object. Crop around it at the model's resolution.
2. Free denoising (first ``free_fraction`` of the steps): DDIM from the noised
   normal latent with eps = eps(C_good) + w_d (eps(C_1) - eps(C_good)), no editing;
   the defect can take shape with the whole crop free.
3. Latent editing (remaining steps): after each DDIM step,
   z_{t-1} <- m_d * z_{t-1} + (1 - m_d) * z_0^bg(t-1) (blended latent diffusion).
4. Online decoder adaptation (latent profiles only): a copy of the VAE decoder is
   optimised for ``adapt_steps`` Adam steps so that D(z_0) matches x outside m_d;
   the pixel-space tiny profile has no decoder and skips this (said in metadata).
5. Pixel-level blending: the decoded crop replaces the input only inside m_d (at
   the image's own resolution), so every pixel outside the mask keeps its bytes.

Realism options (issue 8; ``BlendedConfig``; the plain sampler is ``clip_x0=False,
gray_steps=False, feather=0``; measured in docs/realism-ablation.md):

* ``clip_x0`` (default on): x0^ clamped to [-1, 1] in every DDIM step and eps re-derived
  from it (:func:`~defectforge.diffusion.ddim.bound_eps`, diffusers' ``clip_sample``);
  without it the unbounded estimate shows as saturated plateaus inside m_d (on a real
  Magnetic Tile run 66 % of in-mask pixels saturated, 0 % with the bound; issue 8).
  ``latent_bound`` is the bound for latent profiles (0: off).
* ``gray_steps`` (default on): grayscale sources get x0^ on the grey axis in every step.
* ``feather`` (sigma in px, default 1.5): stage 3's latent blending and stage 5's pixel
  blending use a feathered m_d (:func:`~defectforge.masks.crop.feather_mask`) instead of
  the binary mask, so the seam is not a hard rim; pixels farther than ceil(2 sigma) px
  from m_d keep their bytes.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionStore
from defectforge.diffusion.ddim import add_noise, bound_eps, chroma_range, ddim_schedule, ddim_step, guided
from defectforge.diffusion.sampling import attention_to_image, check_inputs, is_gray, make_crop, paste_back, soft_masks, to_uint8
from defectforge.masks.trimap import DEFECT, make_trimap
from defectforge.config import BlendedConfig
from defectforge.methods.base import DiffusionMethod, GenerationResult


def adapt_decoder(comps, z: torch.Tensor, x: torch.Tensor, background: torch.Tensor, steps: int, lr: float):
    """Stage 4: fine-tune a copy of the decoder so D(z) matches x where ``background`` is 1.

    Returns (adapted autoencoder, background MSE before, after).
    """
    ae = copy.deepcopy(comps.autoencoder)
    ae.requires_grad_(False)
    params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters() if ae.post_quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    denom = background.sum().clamp(min=1) * x.shape[1]

    def bg_mse():
        return (((comps.decode(z, decoder=ae) - x) * background) ** 2).sum() / denom

    with torch.enable_grad():
        before = bg_mse().item()
        for _ in range(steps):
            loss = bg_mse()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = bg_mse().item()
    ae.requires_grad_(False)
    return ae, before, after


@torch.no_grad()
def sample_blended(comps, z0: torch.Tensor, m: torch.Tensor, defect: str, steps: int, guidance: float, free_fraction: float,
                   generator: torch.Generator, store: AttentionStore | None = None, attention_fraction: float = 0.5, *,
                   bound: float | tuple = 0.0, gray: bool = False, soft: torch.Tensor | None = None, chroma: tuple | None = None) -> torch.Tensor:
    """Stages 2-3: free denoising, then blended latent diffusion; returns z_0.

    z_T = sqrt(a_T) z_0 + sqrt(1 - a_T) eps (Eq. 1); each step
    eps = eps(z_t, C_good) + w_d (eps(z_t, C_1) - eps(z_t, C_good)) (DefectDiffu Eq. 4),
    z_{t-1} = DDIM(z_t, eps) (Eq. 3) and, after the first ``free_fraction`` of the steps,
    z_{t-1} <- m_d z_{t-1} + (1 - m_d) (sqrt(a_{t-1}) z_0 + sqrt(1 - a_{t-1}) eps') (blending).
    The random draws come from ``generator`` in that order (z_T's noise, then one eps'
    per blended step). Options (defaults = the plain sampler): ``bound``/``gray`` bound
    x0^ in every step (:func:`~defectforge.diffusion.ddim.bound_eps`), ``soft`` replaces
    m_d by feathered weights in the blend (the UNet's attention mask stays binary).
    """
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    ms = m if soft is None else soft
    c1, k1 = comps.context("defect", defect)
    use_good = guidance != 1.0
    ctx, kinds = [c1], [k1]
    if use_good:
        cg, kg = comps.context("good")
        ctx.append(cg)
        kinds.append(kg)
    ctx, kinds = torch.cat(ctx), torch.stack(kinds)
    n = ctx.shape[0]
    sched = ddim_schedule(comps.scheduler, steps)
    n_free = int(round(free_fraction * len(sched)))
    first_captured = int(round((1 - attention_fraction) * len(sched)))
    z = add_noise(z0, noise, sched[0].alpha_t)  # Eq. (1)
    for i, st in enumerate(sched):
        if store is not None:
            store.active = i >= first_captured
        eps = comps.eps(z.expand(n, -1, -1, -1), st.t, ctx, kinds, m.expand(n, -1, -1, -1),
                        cond_image=z0.expand(n, -1, -1, -1), store=store)
        e = guided(eps[0:1], eps[1:2], guidance) if use_good else eps[0:1]
        e = bound_eps(z, e, st.alpha_t, bound, gray, chroma)
        z = ddim_step(z, e, st.alpha_t, st.alpha_prev)  # Eq. (3)
        if i >= n_free:  # 3. latent blending with the normal latent noised to the new level
            step_noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
            z = ms * z + (1 - ms) * add_noise(z0, step_noise, st.alpha_prev)
    return z


class BlendedMethod(DiffusionMethod):
    """AdaBLDM three-stage blended latent diffusion (see module docstring)."""

    name = "blended"
    config_class = BlendedConfig

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        self._require_models()
        check_inputs(image, mask)
        cfg = self.config
        raw = mask.astype(bool)
        # 1. trimap -> defect region on the object
        region = (make_trimap(image, raw) == DEFECT) if cfg.trimap else raw
        comps = self.models.get(defect)
        gen = torch.Generator().manual_seed(int(seed))
        crop = make_crop(comps, image, region, cfg.crop, cfg.context)
        with torch.no_grad():
            z0 = comps.encode(crop.x)
        m = comps.latent_mask(crop.m)

        gray = is_gray(image)
        pixel = not comps.has_decoder  # identity autoencoder: the latent is the image
        soft, alpha = soft_masks(comps, crop, region, cfg.feather)
        bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
        store = AttentionStore(rows=[0])
        z = sample_blended(comps, z0, m, defect, cfg.steps, cfg.guidance, cfg.free_fraction, gen, store, cfg.attention_fraction,  # 2.-3.
                           bound=bound, gray=cfg.gray_steps and gray and pixel, soft=soft if cfg.feather > 0 else None,
                           chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None)
        # 4. online decoder adaptation
        decoder, adaptation = None, {}
        if not comps.has_decoder:
            adaptation = {"decoder_adaptation": "skipped: pixel-space identity autoencoder has no decoder"}
        elif cfg.adapt_steps > 0:
            decoder, before, after = adapt_decoder(comps, z, crop.x, 1 - crop.m, cfg.adapt_steps, cfg.adapt_lr)
            adaptation = {"decoder_adaptation": {"steps": cfg.adapt_steps, "background_mse_before": before, "background_mse_after": after}}
        else:
            adaptation = {"decoder_adaptation": "off (adapt_steps = 0)"}
        with torch.no_grad():
            generated = to_uint8(comps.decode(z, decoder=decoder), gray)
        # 5. pixel-level blending inside the (feathered) defect region only
        out = paste_back(image, generated, crop.box, only=region, alpha=alpha if cfg.feather > 0 else None)
        att = store.mean_map((comps.resolution, comps.resolution))[0] * crop.m[0, 0].cpu()
        return GenerationResult(
            image=out,
            mask=region,
            attention=attention_to_image(att, region, crop.box),
            metadata=self._metadata(comps, crop, defect, seed, gray, **self.bound_metadata(defect, bound), mask_pixels_off_object=int((raw & ~region).sum()), **adaptation),
        )
