"""AdaBLDM: A Novel Approach to Industrial Defect Generation through Blended Latent
Diffusion Model with Online Adaptation (Li et al.; code: github.com/GrandpaXun242/AdaBLDM).

Seed: ../shared/seeds/adabldm-blended-latent-diffusion.txt is only the abstract, so the
authors' public code is the specification: ``test.py`` (``test_by_triple_map``: trimap,
sampling call, decoder fine-tuning ``recon_loss``) and ``cldm/ddim_hacked.py``
(``DDIMSampler.ddim_sampling_with_pixel_latent_blend``: the three sampling stages).

Notation:

    x, m            normal image crop and target mask; T the trimap (0 background,
                    1 object, 2 defect region = m on the object)
    m_d             defect region (T == 2), in pixels and at latent size
    z_0 = E(x)      latent of the normal crop (pixels for the tiny profile)
    z_t             the sample being denoised; q(z_0, t) = sqrt(a_t) z_0 + sqrt(1 - a_t) eps' (Eq. 1, fresh eps')
    x0^(z_t)        the clean estimate (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) of a DDIM step
    C_1, C_good     [C_def, C_bg], [C_good, C_bg] with masked cross-attention over m_d
    w_d             ``guidance``: eps(C_good) + w_d (eps(C_1) - eps(C_good)) (:func:`~defectforge.diffusion.ddim.guided`;
                    the reference uses classifier-free guidance against the empty prompt)
    N, i            DDIM steps and the step index (0 = noisiest)

Steps of :meth:`Blended.generate` (N steps; n_free = round(free_fraction N),
n_edit = round(edit_fraction N); the reference runs N = 50 with n_free = 26, n_edit = 5):

1. Trimap: object foreground estimate (:func:`defectforge.masks.foreground.estimate_foreground`);
   the defect region is the target mask on the object (reference: ``generate_triple_map``,
   which redraws the position until the defect lies on the object). Crop around it.
2. Free denoising, i < n_free (``ddim_sampling_with_pixel_latent_blend``: no blending
   before ``cutoff_index - 20``): DDIM from z_T ~ N(0, I), pure noise as in the reference
   (``img = torch.randn(shape)``; it computes a noised x_T and leaves it commented out), with
   eps = eps(C_good) + w_d (eps(C_1) - eps(C_good)); the defect takes shape with the crop free.
3. Latent blending, n_free <= i <= N - n_edit (reference: ``cutoff_index - 20 < i <= cutoff_index``):
   *before* step i, z_t <- m_d z_t + (1 - m_d) q(z_0, t_i).
4. Image editing, i >= N - n_edit (reference: ``i >= cutoff_point``, "pixel-level blending"):
   after step i, x^ = D(x0^(z_t)); x^ <- m_d x^ + (1 - m_d) x (pixel mask); z_{t-1} <- q(E(x^), t_{i-1}).
   For the pixel-space tiny profile D and E are the identity, so this is a pixel blend of
   x0^ with x at each of those steps.
5. Online decoder adaptation (latent profiles; reference ``test.py``, ``recon_loss`` and the
   200-step loop): a copy of the decoder D' is optimised with AdamW (lr 1e-4) on
       L = mean((m_d (D'(z_0) - D(z_0)))^2) + lambda mean(((1 - m_d) (D'(z_0) - x))^2),  lambda = 100,
   the in-mask term keeping the generated defect, the weighted term pulling the background
   to the normal image. The reference keeps D'(z_0) for the whole image (``bg_refine``);
   here ``paste: crop`` (default) writes D'(z_0) over the whole crop box, ``paste: mask``
   only over m_d (the former behaviour). The pixel-space tiny profile has no decoder: stage 5
   is skipped (said in metadata) and only m_d is pasted, so the background keeps its bytes
   (the image-editing stage already put x there; the paste only avoids resampling it).

Departures from the reference, and why:

* Stage 4 re-noises to the level the DDIM step just reached, t_{i-1}; the reference calls
  ``q_sample(img_x0, ts)`` with the step's *input* timestep t_i, so its sample is one
  step noisier than the schedule the next step assumes, and its last sample keeps the
  noise of t = 1. Here the last step (a_{t-1} = 1) leaves exactly the edited x^.
* Encoding uses the posterior's mode (the reference samples it): deterministic for a seed.
* The latent mask is the cover-pooled m_d (the reference dilates it by a 5 x 5 kernel).
* The decoder fine-tunes ``decoder`` only, as the reference (not ``post_quant_conv``).
* Trimap (reference: ``generate_triple_map`` drawn as 0 / 127 / 255 into a ControlNet,
  ``cldm/cldm.py``): a diffusers ControlNet on T / 2 (one channel), trained in finetune
  (``finetune.trimap_control``) after the UNet with the UNet frozen; when the fine-tune has
  one (``comps.controlnet``), its residuals join every UNet call of stages 2-4
  (diffusion/control.py). Without one the trimap only clips m_d to the object. With
  ``trimap: false`` the condition marks m_d as defect on an all-object crop.

Realism options (``BlendedConfig``; the plain sampler is ``clip_x0=False,
gray_steps=False, feather=0``; measured in experiments/realism-ablation/realism-ablation.md):

* ``clip_x0`` (default on): x0^ clamped to [-1, 1] in every DDIM step and eps re-derived
  from it (:func:`~defectforge.diffusion.ddim.bound_eps`, diffusers' ``clip_sample``);
  without it the unbounded estimate shows as saturated plateaus inside m_d (on a real
  Magnetic Tile run 66 % of in-mask pixels saturated, 0 % with the bound).
  ``latent_bound`` is the bound for latent profiles (0: off).
* ``gray_steps`` (default on): grayscale sources get x0^ on the grey axis in every step.
* ``feather`` (sigma in px, default 1.5): the latent blending, the image editing and the
  final ``paste: mask`` use a feathered m_d (:func:`~defectforge.masks.crop.feather_mask`)
  instead of the binary mask, so the seam is not a hard rim; pixels farther than
  ceil(2 sigma) px from m_d keep their bytes in the pixel profile.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import copy
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator

from defectforge.diffusion.attention import AttentionStore
from defectforge.diffusion.ddim import add_noise, bound_eps, chroma_range, ddim_schedule, ddim_step, guided, predict_x0
from defectforge.diffusion.sampling import SampleRow, attention_to_image, check_inputs, is_gray, make_crop, paste_back, soft_masks, to_uint8
from defectforge.masks.crop import feather_mask
from defectforge.diffusion.control import trimap_condition
from defectforge.masks.trimap import DEFECT, OBJECT, make_trimap
from defectforge.methods.base import BatchItem, DiffusionMethod, GenerationResult
# a fine-tune may carry DefectDiffu's TDIA or mask module (finetune.tdia / mask_module): its package registers how they load
import defectforge.methods.defectdiffu.attention  # noqa: F401
from defectforge.methods.config import SamplingConfig


def stage_steps(n: int, free_fraction: float, edit_fraction: float) -> tuple[int, int]:
    """(n_free, first_edit): steps i < n_free are free, n_free <= i <= first_edit are blended
    in latent space before the step, i >= first_edit are edited in pixels after it."""
    return int(round(free_fraction * n)), n - int(round(edit_fraction * n))


def adaptation_loss(rec: torch.Tensor, fg: torch.Tensor, x: torch.Tensor, d: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 5's loss (reference ``recon_loss``): (L, in-mask term, background term).

    L = mean((d (D'(z) - D(z)))^2) + weight * mean(((1 - d) (D'(z) - x))^2), means over
    every element as ``F.mse_loss`` takes them; ``d`` the pixel defect mask (1, 1, H, W).
    """
    inside = torch.mean((d * (rec - fg)) ** 2)
    outside = torch.mean(((1 - d) * (rec - x)) ** 2)
    return inside + weight * outside, inside, outside


def _decoder_copy(autoencoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of the autoencoder for decoding only: its encoder is not copied (SD 1.5's is 34.2 M
    parameters, 137 MB in fp32, per adapted sample) and the copy has none."""
    encoder = getattr(autoencoder, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        return copy.deepcopy(autoencoder)
    autoencoder.encoder = None  # the module stays registered as None while it is copied
    try:
        return copy.deepcopy(autoencoder)
    finally:
        autoencoder.encoder = encoder


def adapt_decoder(comps, z: torch.Tensor, x: torch.Tensor, defect: torch.Tensor, steps: int, lr: float, weight: float = 100.0):
    """Stage 5: fine-tune a copy of the decoder with :func:`adaptation_loss` (AdamW, ``steps`` steps).

    ``defect`` is the pixel mask m_d of the crop. Returns (adapted autoencoder, stats) with the
    background MSE (mean over background pixels and channels) and the in-mask drift from
    D(z) before and after.
    """
    with torch.no_grad():
        fg = comps.decode(z)  # the blended sample through the unadapted decoder (reference: fg_image)
    ae = _decoder_copy(comps.autoencoder)
    ae.requires_grad_(False)
    params = list(ae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    n_bg = (1 - defect).sum().clamp(min=1) * x.shape[1]
    n_in = defect.sum().clamp(min=1) * x.shape[1]

    def stats(rec):
        return {"background_mse": float((((rec - x) * (1 - defect)) ** 2).sum() / n_bg),
                "in_mask_drift_mse": float((((rec - fg) * defect) ** 2).sum() / n_in)}

    with torch.enable_grad():
        before = stats(fg)
        for _ in range(steps):
            loss = adaptation_loss(comps.decode(z, decoder=ae), fg, x, defect, weight)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ae.requires_grad_(False)
    with torch.no_grad():
        after = stats(comps.decode(z, decoder=ae))
    return ae, {"background_mse_before": before["background_mse"], "background_mse_after": after["background_mse"],
                "in_mask_drift_mse_after": after["in_mask_drift_mse"]}


@dataclass(kw_only=True)
class BlendRow(SampleRow):
    """One sample of a batched :func:`sample_blended_batch`: a :class:`SampleRow` with the normal
    crop in pixels, the pixel blending mask and the trimap condition (the arguments of
    :func:`sample_blended`)."""

    x: torch.Tensor | None = None
    pixel_mask: torch.Tensor | None = None
    control: torch.Tensor | None = None


@torch.no_grad()
def sample_blended(comps, z0: torch.Tensor, m: torch.Tensor, defect: str, steps: int, guidance: float, free_fraction: float,
                   generator: torch.Generator, store: AttentionStore | None = None, attention_fraction: float = 0.5, *,
                   edit_fraction: float = 0.0, x: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None,
                   bound: float | tuple = 0.0, gray: bool = False, soft: torch.Tensor | None = None, chroma: tuple | None = None,
                   control: torch.Tensor | None = None) -> torch.Tensor:
    """Stages 2-4 (module docstring): free denoising, latent blending, image editing; returns z_0.

    z_T ~ N(0, I); each step eps = eps(z_t, C_good) + w_d (eps(z_t, C_1) - eps(z_t, C_good))
    (guidance against the good prompt, :func:`~defectforge.diffusion.ddim.guided`) and z_{t-1} = DDIM(z_t, eps) (Eq. 3). For n_free <= i <= first_edit
    (:func:`stage_steps`), before the step: z_t <- m_d z_t + (1 - m_d) q(z_0, t). For
    i >= first_edit, after the step: z_{t-1} <- q(E(p x^ + (1 - p) x), t_{i-1}), x^ = D(x0^),
    p = ``pixel_mask`` (default ``soft`` or ``m``: the pixel profile), ``x`` the normal crop
    in pixels (default z_0: the pixel profile).
    The random draws come from ``generator`` in that order (z_T, then per step the blending
    noise, then the editing noise). Options (defaults = the plain sampler): ``bound``/``gray``
    bound x0^ in every step (:func:`~defectforge.diffusion.ddim.bound_eps`), ``soft`` replaces
    m_d by feathered weights in the blending (the UNet's attention mask stays binary).
    ``control``: the trimap condition for ``comps.controlnet`` (both guidance rows, as the
    reference gives its unconditional branch the control too).
    """
    row = BlendRow(z0, m, generator, x=x, pixel_mask=pixel_mask, bound=bound, gray=gray, soft=soft, chroma=chroma, control=control)
    return sample_blended_batch(comps, [row], defect, steps, guidance, free_fraction, store, attention_fraction, edit_fraction=edit_fraction)[0]


@torch.no_grad()
def sample_blended_batch(comps, rows: list[BlendRow], defect: str, steps: int, guidance: float, free_fraction: float,
                         store: AttentionStore | None = None, attention_fraction: float = 0.5, *,
                         edit_fraction: float = 0.0) -> list[torch.Tensor]:
    """:func:`sample_blended` for several samples of one defect type at once; their z_0, in order.

    Every step makes one UNet call with n rows per sample (C_1, then C_good when w_d != 1),
    sample-major: rows k n .. k n + n - 1 are sample k's. Everything else (the draws from
    each sample's own generator, the blending, the bound, the DDIM step, the editing) is done
    row by row exactly as for one sample, so a sample differs from its batch-1 result only by
    the UNet's floating-point sums over a larger batch. ``store`` should keep rows
    ``[k n for k in range(len(rows))]`` (the C_1 rows) to read one map per sample.
    """
    c1, k1 = comps.context("defect", defect)
    use_good = guidance != 1.0
    ctx, kinds = [c1], [k1]
    if use_good:
        cg, kg = comps.context("good")
        ctx.append(cg)
        kinds.append(kg)
    ctx, kinds = torch.cat(ctx), torch.stack(kinds)
    n, b = ctx.shape[0], len(rows)
    sched = ddim_schedule(comps.scheduler, steps)
    n_free, first_edit = stage_steps(len(sched), free_fraction, edit_fraction)
    first_captured = int(round((1 - attention_fraction) * len(sched)))
    # 2. free denoising from pure noise, z_T ~ N(0, I), each sample from its own generator
    zs = [torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype) for r in rows]
    ms = [r.m if r.soft is None else r.soft for r in rows]
    pms = [m if r.pixel_mask is None else r.pixel_mask for r, m in zip(rows, ms)]
    xs = [r.z0 if r.x is None else r.x for r in rows]

    def expand(v):  # one sample's rows: the same tensor under each context
        return v.expand(n, -1, -1, -1)

    # batch 1 passes the views themselves, as the single-sample sampler always has
    m_in = torch.cat([expand(r.m) for r in rows]) if b > 1 else expand(rows[0].m)
    cond = torch.cat([expand(r.z0) for r in rows]) if b > 1 else expand(rows[0].z0)
    ctx_in, kinds_in = (ctx.repeat(b, 1, 1), kinds.repeat(b, 1)) if b > 1 else (ctx, kinds)
    control = None
    if rows[0].control is not None:
        control = torch.cat([r.control.expand(n, -1, -1, -1) for r in rows]) if b > 1 else rows[0].control
    for i, st in enumerate(sched):
        if store is not None:
            store.active = i >= first_captured
        if n_free <= i <= first_edit:  # 3. latent blending with the normal latent noised to this step's level
            for k, r in enumerate(rows):
                blend_noise = torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype)
                zs[k] = ms[k] * zs[k] + (1 - ms[k]) * add_noise(r.z0, blend_noise, st.alpha_t)
        z_in = torch.cat([expand(z) for z in zs]) if b > 1 else expand(zs[0])
        eps = comps.eps(z_in, st.t, ctx_in, kinds_in, m_in, cond_image=cond, store=store, control=control)
        for k, r in enumerate(rows):
            z = zs[k]
            e = guided(eps[k * n:k * n + 1], eps[k * n + 1:k * n + 2], guidance) if use_good else eps[k * n:k * n + 1]
            e = bound_eps(z, e, st.alpha_t, r.bound, r.gray, r.chroma)
            x0_hat = predict_x0(z, e, st.alpha_t)
            z = ddim_step(z, e, st.alpha_t, st.alpha_prev)  # Eq. (3)
            if i >= first_edit:  # 4. image editing: decode x0^, paste x outside m_d, re-encode, re-noise to t_{i-1}
                edited = pms[k] * comps.decode(x0_hat) + (1 - pms[k]) * xs[k]
                edit_noise = torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype)
                z = add_noise(comps.encode(edited), edit_noise, st.alpha_prev)
            zs[k] = z
    return zs


class BlendedConfig(SamplingConfig):
    """AdaBLDM: free denoising, latent blending, pixel blending, decoder adaptation."""

    section: ClassVar[str] = "blended"
    free_fraction: float = Field(0.52, ge=0, lt=1)  # first share of steps denoised free from pure noise (reference: 26 of 50)
    edit_fraction: float = Field(0.1, ge=0, lt=1)   # last share of steps with image editing (reference: 5 of 50)
    trimap: bool = True                             # clip the mask to the estimated object foreground
    adapt_steps: int = Field(200, ge=0, le=10000)   # online decoder adaptation, AdamW steps (reference: 200; 0 = off)
    adapt_lr: float = Field(1e-4, gt=0, le=1)       # (reference: 1e-4)
    adapt_weight: float = Field(100.0, ge=0, le=1e6)  # weight of the background term against the in-mask term (reference: 100)
    paste: Literal["crop", "mask"] = "crop"         # crop: the adapted decoder's whole crop (reference); mask: only m_d
    control: bool = True                            # feed the trimap to the fine-tune's ControlNet when it has one (false: ablation)

    @model_validator(mode="after")
    def _stages_fit(self) -> "BlendedConfig":
        if self.free_fraction + self.edit_fraction > 1:
            raise ValueError(f"free_fraction + edit_fraction must be <= 1, got {self.free_fraction} + {self.edit_fraction}")
        return self


class Blended(DiffusionMethod):
    """AdaBLDM three-stage blended latent diffusion with online decoder adaptation (see module docstring)."""

    name = "blended"
    config_class = BlendedConfig

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type, their UNet rows in one call per step (:func:`sample_blended_batch`)."""
        self._require_models()
        cfg = self.config
        defect = items[0].defect
        comps = self.models.get(defect)
        pixel = not comps.has_decoder  # identity autoencoder: the latent is the image
        feathered = cfg.feather > 0
        prepared, rows = [], []
        for it in items:
            image = it.image
            check_inputs(image, it.mask)
            raw = it.mask.astype(bool)
            # 1. trimap -> defect region on the object
            trimap = make_trimap(image, raw) if cfg.trimap else np.where(raw, DEFECT, OBJECT).astype(np.uint8)
            region = trimap == DEFECT
            gen = torch.Generator().manual_seed(int(it.seed))
            crop = make_crop(comps, image, region, cfg.crop, cfg.context)
            with torch.no_grad():
                z0 = comps.encode(crop.x)
            m = comps.latent_mask(crop.m)
            gray = is_gray(image)
            soft, alpha = soft_masks(comps, crop, region, cfg.feather)
            pixel_mask = (torch.from_numpy(feather_mask(crop.mask, cfg.feather))[None, None].to(crop.x) if feathered else crop.m)
            bound = self.x0_bound(defect, pixel, soft if feathered else m)
            control = None
            if cfg.control and getattr(comps, "controlnet", None) is not None:  # the trimap through the ControlNet trained in finetune (spatial guidance)
                ys, xs = crop.box.slices()
                control = trimap_condition(torch.from_numpy(trimap[ys, xs].astype(np.float32))[None, None], comps.resolution).to(comps.device)
            rows.append(BlendRow(z0, m, gen, x=crop.x, pixel_mask=pixel_mask, bound=bound, gray=cfg.gray_steps and gray and pixel,
                                 soft=soft if feathered else None,
                                 chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None, control=control))
            prepared.append((it, raw, region, crop, gray, alpha, bound, control))
        n = 2 if cfg.guidance != 1.0 else 1  # UNet rows per sample; the C_1 rows hold the defect attention
        store = AttentionStore(rows=[k * n for k in range(len(items))])
        zs = sample_blended_batch(comps, rows, defect, cfg.steps, cfg.guidance, cfg.free_fraction, store, cfg.attention_fraction,  # 2.-4.
                                  edit_fraction=cfg.edit_fraction)
        maps = store.mean_map((comps.resolution, comps.resolution))
        return [self._finish(comps, pixel, feathered, z, maps[k], *prep) for k, (z, prep) in enumerate(zip(zs, prepared))]

    def _finish(self, comps, pixel: bool, feathered: bool, z: torch.Tensor, att_map: torch.Tensor, it: BatchItem, raw, region, crop, gray,
                alpha, bound, control) -> GenerationResult:
        """Stage 5 and the paste-back of one sample."""
        cfg, image, defect = self.config, it.image, it.defect
        # 5. online decoder adaptation
        decoder, adaptation = None, {}
        if pixel:
            adaptation = {"decoder_adaptation": "skipped: pixel-space identity autoencoder has no decoder"}
        elif cfg.adapt_steps > 0:
            decoder, stats = adapt_decoder(comps, z, crop.x, crop.m, cfg.adapt_steps, cfg.adapt_lr, cfg.adapt_weight)
            adaptation = {"decoder_adaptation": {"steps": cfg.adapt_steps, "weight": cfg.adapt_weight, **stats}}
        else:
            adaptation = {"decoder_adaptation": "off (adapt_steps = 0)"}
        with torch.no_grad():
            generated = to_uint8(comps.decode(z, decoder=decoder), gray)
        # the adapted decoder's whole crop (reference), or only the (feathered) defect region
        if cfg.paste == "crop" and not pixel:
            out = paste_back(image, generated, crop.box)
        else:
            out = paste_back(image, generated, crop.box, only=region, alpha=alpha if feathered else None)
        att = att_map * crop.m[0, 0].cpu()
        return GenerationResult(
            image=out,
            mask=region,
            attention=attention_to_image(att, region, crop.box),
            metadata=self._metadata(comps, crop, defect, it.seed, gray, **self.bound_metadata(defect, bound), mask_pixels_off_object=int((raw & ~region).sum()),
                                    trimap_control=control is not None, stages=dict(zip(("n_free", "first_edit"), stage_steps(cfg.steps, cfg.free_fraction, cfg.edit_fraction))), **adaptation),
        )
