"""Revisiting DDIM Inversion for Controlling Defect Generation by Disentangling the Background.

Seed paper: ../shared/seeds/ddim-inversion-disentangled-background.txt (training in
:mod:`defectforge.diffusion.training`, Eq. 5-7; masked cross-attention Eq. 10-11
in :mod:`defectforge.diffusion.attention`; this file is the inference, Sec. 3.2).

Notation:

    x, m            normal image crop and target mask (pixels); m also at latent size
    z_0 = E(x)      its latent (the pixels themselves for the tiny profile)
    z_0^m           (1 - m) * z_0, the masked normal latent
    C_1, C_2        [C_def, C_bg] (defect branch), [C_m, C_bg] (background branch)
    C_good          [C_good, C_bg], the defect-free baseline for guidance
    alpha_t         cumulative alphas of the DDIM schedule (``steps`` steps)
    w_d             ``guidance``: defect-vs-good guidance under the same context, eps(C_good) + w_d (eps(C_1) - eps(C_good))
                    (:func:`~defectforge.diffusion.ddim.guided`; not DefectDiffu's Eq. 4, which needs a null condition)

Steps of :meth:`Inversion.generate`:

1. Crop around the target mask at the model's resolution (or the whole image).
2. DDIM-invert the masked normal latent, Eq. (8):
   z~^m_t = sqrt(a_t) [ z~^m_{t-1} / sqrt(a_{t-1}) + (1 - m) (sqrt(1/a_t - 1) - sqrt(1/a_{t-1} - 1)) eps(z~^m_{t-1}, C_2) ]
3. Initialise with noise inside the mask, Theorem 1: z*_T = z~^m_T + m * eps, eps ~ N(0, I).
4. Sample with Eq. (9), both branches in one batched UNet call per step:
   eps* = (1 - m) eps(z^m_t, C_2) + m * eps_d,  eps_d = eps(z*_t, C_good) + w_d (eps(z*_t, C_1) - eps(z*_t, C_good))
   z*_{t-1} = DDIM(z*_t, eps*)  and  z^m_{t-1} = DDIM(z^m_t, (1 - m) eps(z^m_t, C_2)),
   so outside the mask z* follows the inverted background exactly (Proposition 1).
5. Capture the defect tokens' cross-attention of the defect branch over the last
   ``attention_fraction`` of the steps (input of Eq. 13, :func:`defectforge.masks.refine.refine_mask`).
6. Decode, paste the crop back (whole crop, or only the mask pixels with ``paste="mask"``).

``generate_batch`` (samples of one defect type) runs steps 2-5 for all its samples together:
one UNet call per inversion step with one C_2 row per sample (:func:`invert_masked_batch`)
and one per sampling step with every sample's Eq. (9) rows (:func:`sample_eq9_batch`); each
sample keeps its own inversion path, noise generator and attention rows.

With ``guidance = 1`` and ``background = "sampled"`` step 4 is exactly the paper's Eq. (9)
(C_good is not evaluated). The default ``background = "inverted"`` reads the
background branch from the stored inversion path instead of re-sampling it (the
"direct inversion" correction): with a small model the inversion error of Eq. (8)
showed as a colour cast over the whole crop (measured on Magnetic Tile, see
experiments/diffusion-bench/diffusion-bench.md); reading the path removes it while the defect branch
still follows Eq. (9) inside the mask.

Realism options (``InversionConfig``; the paper's sampler is ``clip_x0=False,
gray_steps=False, feather=0, paste="crop"``; measured in experiments/realism-ablation/realism-ablation.md):

* ``clip_x0`` (default on): in every step of Eq. (9) the clean estimate
  x0^ = (z*_t - sqrt(1 - a_t) eps*) / sqrt(a_t) is clamped to [-1, 1] and eps* re-derived
  from it (:func:`~defectforge.diffusion.ddim.bound_eps`, diffusers' ``clip_sample``).
  Without it a small model's x0^ leaves the image range inside the mask and only the
  final uint8 conversion clamps: pitch-black / white / pure-colour plateaus. On a real
  Magnetic Tile run the in-mask saturated share falls from 67 % to 0 %. For
  latent profiles the bound is ``latent_bound`` (0: off), since SD latents are not in [-1, 1].
* ``real_range`` (default on, pixel profile, with ``clip_x0``): inside the (feathered)
  mask the bound is tighter, the per-channel ``real_range_q`` / ``1 - real_range_q``
  quantiles of the type's real training defects' in-mask pixels (``prepare`` reads them;
  :meth:`~defectforge.methods.base.DiffusionMethod.x0_bound`). [-1, 1] still lets the
  floor of a pit reach pure black where no real pit does (the built-in brick holes).
* What may be bounded. The background branch z^m_t is the DDIM path of the masked
  normal latent z_0^m = (1 - m) z_0: by Lemma 1 its clean estimate is (1 - m) z_0, exactly
  0 inside m, and Eq. (12)'s masked self-attention and Proposition 1 rest on
  m * z^m_t = 0 for every t. A bound may act on z^m only where it cannot move that
  target: outside m, the image range [-1, 1] (``latent_bound`` on latent profiles) and,
  for a grey source, the grey axis. The defect's value range [lo, hi] is not one of
  them (inside m it would clamp x0^ = 0 into [lo, hi], which excludes 0 for a dark pit
  on a bright surface, and fill z^m with the defect's grey), nor is the chroma bound (a
  1 % / 99 % quantile range: about 2 % of the real background lies outside it). So z^m
  gets the [-1, 1] / grey bound, multiplied by (1 - m); z* gets the same bound outside
  the (soft) mask, where Eq. (9)'s eps* is z^m's, so the two stay equal there
  (Proposition 1), and the real range and the chroma bound only inside it, where the
  defect is painted.
* ``gray_steps`` (default on): for a grayscale source x0^ is projected onto the grey
  axis inside every step, not only at the end: colour never builds up along the path.
* ``feather`` (sigma in px, default 1.5): Eq. (9)'s mix, the blend with the inversion
  path and the final paste use a feathered mask (1 inside m, falling to 0 within
  ceil(2 sigma) px outside; :func:`~defectforge.masks.crop.feather_mask`), so the defect
  does not end in a hard 1-px rim; the UNet's attention mask, Eq. (8) and Theorem 1's
  noise stay binary, and every pixel beyond the feather's reach keeps its bytes.
* ``paste`` (default ``"mask"``): only the (feathered) mask pixels are written back;
  ``"crop"`` resamples the whole box, which blurs the surroundings of long cracks
  whose box is larger than the model.
* ``defect_background`` (default ``"inverted"``): in training (Eq. 6) the defect branch
  sees z_t noised everywhere, at inference it sees the inverted background. ``"noised"``
  feeds it sqrt(a_t) z_0 + sqrt(1 - a_t) eps outside the mask (a fresh eps per step).
* ``guidance`` w_d: measured at 1, 1.5 and 2.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionStore
from defectforge.diffusion.ddim import add_noise, bound_eps, chroma_range, ddim_schedule, ddim_step, guided
from defectforge.diffusion.sampling import SampleRow, attention_to_image, is_gray, paste_back, soft_masks, to_uint8
from defectforge.methods.base import BatchItem, DiffusionMethod, GenerationResult
# a fine-tune may carry DefectDiffu's TDIA or mask module (finetune.tdia / mask_module): its package registers how they load
import defectforge.methods.defectdiffu.attention  # noqa: F401
from defectforge.methods.config import SamplingConfig


@torch.no_grad()
def invert_masked(comps, z0: torch.Tensor, m: torch.Tensor, steps: int, trajectory: list | None = None) -> torch.Tensor:
    """Eq. (8): DDIM inversion of z_0^m = (1 - m) z_0 with C_2; returns z~^m_T.

    The UNet is evaluated at each step's own timestep t (as diffusers'
    DDIMInverseScheduler and null-text inversion do); the paper writes t - 1.
    ``trajectory`` (a list) receives z~^m_t after every step, cleanest first.
    """
    return invert_masked_batch(comps, [z0], [m], steps, [trajectory])[0]


@torch.no_grad()
def invert_masked_batch(comps, z0s: list[torch.Tensor], ms: list[torch.Tensor], steps: int,
                        trajectories: list[list | None] | None = None) -> list[torch.Tensor]:
    """:func:`invert_masked` for several samples at once; their z~^m_T, in order.

    One UNet call per step with one C_2 row per sample (its own z~^m_t, mask and z_0);
    Eq. (8)'s update is applied row by row, so a sample differs from its batch-1 path
    only by the UNet's floating-point sums over a larger batch. ``trajectories[k]`` (a
    list or None) receives sample k's path, cleanest first.
    """
    b = len(z0s)
    trajectories = trajectories if trajectories is not None else [None] * b
    c2, k2 = comps.context("mask")  # one context, broadcast over the rows
    cat = (lambda ts: torch.cat(ts)) if b > 1 else (lambda ts: ts[0])  # batch 1 passes its tensors as they are
    m_in, z0_in = cat(ms), cat(z0s)
    zs = [(1 - m) * z0 for z0, m in zip(z0s, ms)]
    for st in reversed(ddim_schedule(comps.scheduler, steps)):
        for z, path in zip(zs, trajectories):
            if path is not None:
                path.append(z)
        eps = comps.eps(cat(zs), st.t, c2, k2, m_in, cond_image=z0_in)
        zs = [ddim_step(z, (1 - m) * eps[k:k + 1], st.alpha_prev, st.alpha_t) for k, (z, m) in enumerate(zip(zs, ms))]  # Eq. (8)
    return zs


@dataclass(kw_only=True)
class Eq9Row(SampleRow):
    """One sample of :func:`sample_eq9_batch`: a :class:`SampleRow` with Theorem 1's z_T^m and its
    inversion path (or None); the options are the arguments of :func:`sample_eq9`."""

    z_T_m: torch.Tensor
    trajectory: list | None = None


@torch.no_grad()
def sample_eq9(comps, z_T_m: torch.Tensor, z0: torch.Tensor, m: torch.Tensor, defect: str, steps: int, guidance: float,
               generator: torch.Generator, store: AttentionStore | None = None, attention_fraction: float = 0.5,
               trajectory: list | None = None, *, bound: float | tuple = 0.0, gray: bool = False, soft: torch.Tensor | None = None,
               noised_background: bool = False, chroma: tuple | None = None):
    """Theorem 1 initialisation and Eq. (9) sampling; returns (z*_0, z^m_0).

    With ``trajectory`` (the inversion path from :func:`invert_masked`) the background
    branch is not re-sampled but read from the inversion path, z^m_{t-1} := z~^m_{t-1}
    (the "direct inversion" correction of Ju et al., 2023): the background part of
    z* then ends exactly at (1 - m) z_0 whatever the inversion error. Without it,
    this is the paper's Eq. (9), whose background reproduces z_0 only up to the
    DDIM inversion error (Proposition 1).

    The keyword options are the realism fixes (module docstring); their defaults are
    the paper's sampler: ``bound`` (> 0: x0^ clamped to [-bound, bound] in every step,
    :func:`~defectforge.diffusion.ddim.bound_eps`), ``gray`` (x0^ on the grey axis),
    ``soft`` (feathered weights replacing m in Eq. 9's mix and in the path blend; the
    UNet's mask and Theorem 1's noise stay binary), ``noised_background`` (the defect
    branch sees sqrt(a_t) z_0 + sqrt(1 - a_t) eps outside m, Eq. 6, as in training),
    ``chroma`` (x0^'s colour bounded to the source's gamut). The real range and ``chroma``
    bind z* inside the (soft) mask only; z^m gets the [-1, 1] / grey bound times (1 - m),
    so m * z^m_t = 0 at every step (module docstring, "What may be bounded").
    """
    row = Eq9Row(z0, m, generator, z_T_m=z_T_m, trajectory=trajectory, bound=bound, gray=gray, soft=soft, chroma=chroma)
    return sample_eq9_batch(comps, [row], defect, steps, guidance, store, attention_fraction, noised_background=noised_background)[0]


@torch.no_grad()
def sample_eq9_batch(comps, rows: list[Eq9Row], defect: str, steps: int, guidance: float, store: AttentionStore | None = None,
                     attention_fraction: float = 0.5, *, noised_background: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sample_eq9` for several samples of one defect type at once; their (z*_0, z^m_0), in order.

    Every step makes one UNet call with n rows per sample, sample-major: rows k n .. k n + n - 1
    are sample k's [z^m_t under C_2, z*_t under C_1, (z*_t under C_good when w_d != 1)].
    Everything else (Theorem 1's noise and Eq. 6's background noise from each sample's own
    generator, Eq. 9's mix, the bounds, the DDIM steps, the path blend) is done row by row
    exactly as for one sample, so a sample differs from its batch-1 result only by the UNet's
    floating-point sums over a larger batch. ``store`` should keep rows
    ``[k n + 1 for k in range(len(rows))]`` (the C_1 rows) to read one map per sample.
    """
    b = len(rows)
    z_stars = [r.z_T_m + r.m * torch.randn(r.z_T_m.shape, generator=r.generator).to(r.z_T_m.device, r.z_T_m.dtype)
               for r in rows]  # Theorem 1
    z_ms = [r.z_T_m for r in rows]
    mss = [r.m if r.soft is None else r.soft for r in rows]
    c1, k1 = comps.context("defect", defect)
    c2, k2 = comps.context("mask")
    use_good = guidance != 1.0
    ctx, kinds = [c2, c1], [k2, k1]
    if use_good:
        cg, kg = comps.context("good")
        ctx.append(cg)
        kinds.append(kg)
    ctx, kinds = torch.cat(ctx), torch.stack(kinds)
    n = ctx.shape[0]
    # batch 1 passes the views themselves, as the single-sample sampler always has
    m_in = torch.cat([r.m.expand(n, -1, -1, -1) for r in rows]) if b > 1 else rows[0].m.expand(n, -1, -1, -1)
    cond = torch.cat([r.z0.expand(n, -1, -1, -1) for r in rows]) if b > 1 else rows[0].z0.expand(n, -1, -1, -1)
    ctx_in, kinds_in = (ctx.repeat(b, 1, 1), kinds.repeat(b, 1)) if b > 1 else (ctx, kinds)
    sched = ddim_schedule(comps.scheduler, steps)
    first_captured = int(round((1 - attention_fraction) * len(sched)))
    for i, st in enumerate(sched):
        if store is not None:
            store.active = i >= first_captured
        z_in = []
        for r, z_star, z_m in zip(rows, z_stars, z_ms):
            z_def = z_star
            if noised_background:  # Eq. (6): the background the defect branch was trained with
                bg_noise = torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype)
                z_def = r.m * z_star + (1 - r.m) * add_noise(r.z0, bg_noise, st.alpha_t)
            z_in.append(torch.cat([z_m, z_def] + ([z_def] if use_good else [])))
        eps = comps.eps(torch.cat(z_in) if b > 1 else z_in[0], st.t, ctx_in, kinds_in, m_in, cond_image=cond, store=store)
        for k, r in enumerate(rows):
            z_star, z_m, ms, m = z_stars[k], z_ms[k], mss[k], r.m
            bg_bound = 1.0 if isinstance(r.bound, tuple) else r.bound  # the per-pixel maps are [-1, 1] outside the mask
            eps_bg = eps[k * n:k * n + 1]  # eps(z^m_t, t, C_2)
            eps_def = (guided(eps[k * n + 1:k * n + 2], eps[k * n + 2:k * n + 3], guidance) if use_good
                       else eps[k * n + 1:k * n + 2])  # eps(z*_t, t, C_1), guided
            eps_star = (1 - ms) * eps_bg + ms * eps_def  # Eq. (9)
            if r.chroma is not None:  # the colour gamut binds the defect only: outside the (soft) mask eps* is z^m's
                eps_star = torch.where(ms > 0, bound_eps(z_star, eps_star, st.alpha_t, r.bound, r.gray, r.chroma),
                                       bound_eps(z_star, eps_star, st.alpha_t, r.bound, r.gray))
            else:
                eps_star = bound_eps(z_star, eps_star, st.alpha_t, r.bound, r.gray)
            z_star = ddim_step(z_star, eps_star, st.alpha_t, st.alpha_prev)  # Eq. (9) = Eq. (3) with eps*
            eps_m = (1 - m) * bound_eps(z_m, (1 - m) * eps_bg, st.alpha_t, bg_bound, r.gray)  # m * z^m_t = 0 (Eq. 12, Prop. 1)
            z_m = ddim_step(z_m, eps_m, st.alpha_t, st.alpha_prev)
            if r.trajectory is not None:
                z_m = r.trajectory[len(sched) - 1 - i]
                z_star = (1 - ms) * z_m + ms * z_star
            z_stars[k], z_ms[k] = z_star, z_m
    return list(zip(z_stars, z_ms))


class InversionConfig(SamplingConfig):
    """DDIM inversion (Eq. 8), noise in the mask (Thm. 1), sampling with Eq. 9."""

    section: ClassVar[str] = "inversion"
    paste: Literal["crop", "mask"] = "mask"                 # mask: only (feathered) target-mask pixels change
    background: Literal["inverted", "sampled"] = "inverted"  # read the background from the Eq. 8 path, or Eq. 9's
    defect_background: Literal["inverted", "noised"] = "inverted"  # defect branch outside m: inverted path or noised z_0 (Eq. 6)


class Inversion(DiffusionMethod):
    """DDIM inversion with disentangled background (see module docstring)."""

    name = "inversion"
    config_class = InversionConfig

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type: Eq. (8) and Eq. (9) with all their UNet rows in one call per step
        (:func:`invert_masked_batch`, :func:`sample_eq9_batch`)."""
        self._require_models()
        cfg = self.config
        defect = items[0].defect
        comps = self.models.get(defect)
        pixel = not comps.has_decoder  # identity autoencoder: the latent is the image
        rows, prepared = [], []
        for it in items:
            image = it.image
            mask, gen, crop = self._crop(comps, it)  # 1.
            z0 = comps.encode(crop.x)
            m = comps.latent_mask(crop.m)
            gray = is_gray(image)
            soft, alpha = soft_masks(comps, crop, mask, cfg.feather)
            bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
            path = [] if cfg.background == "inverted" else None
            rows.append(dict(z0=z0, m=m, generator=gen, trajectory=path, bound=bound, gray=cfg.gray_steps and gray and pixel,
                             soft=soft if cfg.feather > 0 else None,
                             chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None))
            prepared.append((it, mask, crop, gray, alpha, bound))
        z_T_ms = invert_masked_batch(comps, [r["z0"] for r in rows], [r["m"] for r in rows], cfg.steps,  # 2. Eq. (8)
                                     [r["trajectory"] for r in rows])
        rows = [Eq9Row(z_T_m=z_T_m, **r) for r, z_T_m in zip(rows, z_T_ms)]
        n = 3 if cfg.guidance != 1.0 else 2  # UNet rows per sample in Eq. (9); row 1 of each is the defect branch C_1
        store = AttentionStore(rows=[k * n + 1 for k in range(len(items))])
        outs = sample_eq9_batch(comps, rows, defect, cfg.steps, cfg.guidance, store, cfg.attention_fraction,  # 3.-5.
                                noised_background=cfg.defect_background == "noised")
        maps = store.mean_map((comps.resolution, comps.resolution))
        results = []
        for k, ((z_star, _), (it, mask, crop, gray, alpha, bound)) in enumerate(zip(outs, prepared)):
            with torch.no_grad():
                x_gen = comps.decode(z_star)
            generated = to_uint8(x_gen, gray)
            att = maps[k] * crop.m[0, 0].cpu()  # m' * A_def (Eq. 13 input)
            if cfg.paste == "crop":  # 6.
                out = paste_back(it.image, generated, crop.box)
            else:
                out = paste_back(it.image, generated, crop.box, only=mask, alpha=alpha if cfg.feather > 0 else None)
            results.append(GenerationResult(
                image=out,
                mask=mask,
                attention=attention_to_image(att, mask, crop.box),
                metadata=self._metadata(comps, crop, defect, it.seed, gray, **self.bound_metadata(defect, bound)),
            ))
        return results
