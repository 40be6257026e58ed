"""DDIM updates written as in the DDIM-inversion paper (Eq. 1, 3, 4).

Notation (../shared/seeds/ddim-inversion-disentangled-background.txt, Sec. 2):

    alpha_t      the scheduler's cumulative product ``alphas_cumprod[t]`` (the paper's alpha_t)
    z_t          latent (pixels for the tiny profile) at timestep t
    eps          epsilon_theta(z_t, t, C), the UNet's noise prediction

    z_t     = sqrt(alpha_t) z_0 + sqrt(1 - alpha_t) eps                                  (1)
    z_{t-1} = sqrt(alpha_{t-1}) [ z_t / sqrt(alpha_t)
              + (sqrt(1/alpha_{t-1} - 1) - sqrt(1/alpha_t - 1)) eps ]                     (3)
    z~_t    = sqrt(alpha_t) [ z~_{t-1} / sqrt(alpha_{t-1})
              + (sqrt(1/alpha_t - 1) - sqrt(1/alpha_{t-1} - 1)) eps ]                     (4)

(3) and (4) are the same map ``ddim_step(z, eps, alpha_from, alpha_to)``: sampling
goes from a noisier alpha to a cleaner one, inversion the other way. The timesteps
and alphas come from diffusers' :class:`~diffusers.DDIMScheduler` (``set_timesteps``,
``alphas_cumprod``, ``final_alpha_cumprod``), and ``ddim_step`` equals
``DDIMScheduler.step(..., eta=0)`` (tested).

Bounding the clean estimate (``bound_eps``), as diffusers' DDIMScheduler does with
``clip_sample=True, use_clipped_model_output=True``:

    x0^ = (z_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)                                 (Eq. 3, first term)
    x0^ <- clamp(x0^, -b, b)           (and, for grayscale sources, its channel mean)
    eps <- (z_t - sqrt(alpha_t) x0^) / sqrt(1 - alpha_t)

so the DDIM step (3) lands on a point whose clean estimate is a valid image. Without
it a small model's x0^ leaves [-1, 1] inside the defect mask and only the final
uint8 conversion clamps: measured as saturated black / white / colour blobs
(experiments/realism-ablation/realism-ablation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DDIMStep:
    t: int  # timestep the UNet is evaluated at
    alpha_t: float  # alpha of the noisier end of the step
    alpha_prev: float  # alpha of the cleaner end (alpha_{t-1})


def ddim_schedule(scheduler, steps: int) -> list[DDIMStep]:
    """The sampling path, noisiest step first: [(t, alpha_t, alpha_{t-1}), ...]."""
    if steps < 1 or steps > scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{scheduler.config.num_train_timesteps}, got {steps}")
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    ac = scheduler.alphas_cumprod
    out = []
    for i, t in enumerate(ts):
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else float(scheduler.final_alpha_cumprod)
        out.append(DDIMStep(t, float(ac[t]), a_prev))
    return out


def add_noise(z0: torch.Tensor, eps: torch.Tensor, alpha) -> torch.Tensor:
    """Eq. (1): z_t = sqrt(alpha_t) z_0 + sqrt(1 - alpha_t) eps."""
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    return alpha.sqrt() * z0 + (1 - alpha).sqrt() * eps


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Eq. (3) (alpha_to > alpha_from, denoising) or Eq. (4) (alpha_to < alpha_from, inversion)."""
    a_f = torch.as_tensor(alpha_from, dtype=z.dtype, device=z.device)
    a_t = torch.as_tensor(alpha_to, dtype=z.dtype, device=z.device)
    return a_t.sqrt() * (z / a_f.sqrt() + ((1 / a_t - 1).sqrt() - (1 / a_f - 1).sqrt()) * eps)


def predict_x0(z: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Clean estimate z_0 = (z_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)."""
    a = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def chroma_range(x: torch.Tensor, q: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour gamut of a pixel-space crop x (1, 3, H, W): per channel the ``q`` and
    ``1 - q`` quantiles of its chroma x - mean_c(x); two (1, 3, 1, 1) tensors."""
    c = (x - x.mean(dim=1, keepdim=True)).flatten(2).float()
    lo, hi = torch.quantile(c, q, dim=2), torch.quantile(c, 1 - q, dim=2)
    return lo[..., None, None].to(x.dtype), hi[..., None, None].to(x.dtype)


def range_bounds(lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel x0^ bounds: the range ``[lo, hi]`` (per channel, model units) where ``weights``
    (1, 1, h, w) is 1, the full range [-1, 1] where it is 0, linear in between:
    lo_map = -1 + w (lo + 1), hi_map = 1 - w (1 - hi). Two (1, C, h, w) tensors for :func:`bound_eps`."""
    lo = lo.to(weights.device, weights.dtype).view(1, -1, 1, 1)
    hi = hi.to(weights.device, weights.dtype).view(1, -1, 1, 1)
    return -1 + weights * (lo + 1), 1 - weights * (1 - hi)


def bound_eps(z: torch.Tensor, eps: torch.Tensor, alpha: float, bound: float | tuple[torch.Tensor, torch.Tensor] = 1.0,
              gray: bool = False, chroma: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The noise prediction re-derived from a bounded clean estimate (module docstring).

    ``bound`` <= 0 leaves x0^ unclamped, ``bound`` > 0 clamps it to [-bound, bound], and a
    pair of tensors (lo, hi) from :func:`range_bounds` clamps it pixel by pixel (the real
    defects' value range inside the mask); ``gray`` projects x0^ onto the grey axis (the
    channel mean, pixel space only); ``chroma`` = (lo, hi) from :func:`chroma_range`
    bounds x0^'s chroma per channel to the source's gamut (colour products: the
    defect may change brightness and texture, not paint colours the product does not
    have). With none of them, ``eps`` is returned unchanged.
    """
    ranged = isinstance(bound, tuple)
    if not ranged and bound <= 0 and not gray and chroma is None:
        return eps
    a = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
    x0 = predict_x0(z, eps, alpha)
    if ranged:
        x0 = torch.minimum(torch.maximum(x0, bound[0]), bound[1])
    elif bound > 0:
        x0 = x0.clamp(-bound, bound)
    if gray:
        x0 = x0.mean(dim=1, keepdim=True).expand_as(x0)
    elif chroma is not None:
        g = x0.mean(dim=1, keepdim=True)
        c = torch.minimum(torch.maximum(x0 - g, chroma[0]), chroma[1])
        x0 = g + c - c.mean(dim=1, keepdim=True)  # re-centred: the grey level (the defect's brightness) is kept exactly
    if ranged and (gray or chroma is not None):  # the projections move channels: the per-pixel range has the last word
        x0 = torch.minimum(torch.maximum(x0, bound[0]), bound[1])
    return (z - a.sqrt() * x0) / (1 - a).sqrt()


def guided(eps_cond: torch.Tensor, eps_base: torch.Tensor, w: float) -> torch.Tensor:
    """One-weight classifier-free guidance with the "good" prompt as the baseline, both rows
    under the same product condition c_p (the blended and inversion samplers):

        eps = eps(c_g, c_p) + w (eps(c_d, c_p) - eps(c_g, c_p));   w = 1 is plain conditioning.

    This is *not* DefectDiffu's Eq. (4) with w_p = 1: that takes the defect direction
    against the null product condition, eps(c_g, c_p) + w_d (eps(c_d, 0) - eps(c_g, 0))
    (:func:`double_free`); the two agree only when the defect direction does not depend on
    c_p. The blended and inversion papers have no null product condition, and their
    checkpoints have one only when finetune ran Algorithm 1's dropout (a DefectDiffu option)."""
    return eps_base + w * (eps_cond - eps_base)


def double_free(eps_good_null: torch.Tensor, eps_good_product: torch.Tensor, eps_defect_null: torch.Tensor,
                w_p: float, w_d: float) -> torch.Tensor:
    """DefectDiffu's double-free guidance, Eq. (4) of
    ../shared/seeds/defectdiffu-consistency-modeling.txt (Sec. 3.3):

        eps(x_t, t, c_d, c_p) = eps(x_t, t, c_g, 0)
                                + w_p (eps(x_t, t, c_g, c_p) - eps(x_t, t, c_g, 0))      F_p, product direction
                                + w_d (eps(x_t, t, c_d, 0)   - eps(x_t, t, c_g, 0))      F_d, defect direction

    c_g is the "good" defect condition, c_p the product condition, 0 the null (dropped)
    product condition of Algorithm 1. The defect direction is taken *without* the product
    condition, which is what lets a defect learned on one product be added to another
    (Eq. 12, zero-shot). w_p = 1, w_d = 0 gives the product's normal image; w_d sets the
    defect strength. (:func:`guided` is the one-weight form under c_p used by the other
    methods; it is not this equation at w_p = 1.)
    """
    return eps_good_null + w_p * (eps_good_product - eps_good_null) + w_d * (eps_defect_null - eps_good_null)


def zero_shot_guidance(target_good_null: torch.Tensor, target_good_product: torch.Tensor, source_good_null: torch.Tensor,
                       source_defect_null: torch.Tensor, w_p: float, w_d: float) -> torch.Tensor:
    """DefectDiffu's zero-shot generation, Eq. (12) (Sec. 3.6): the product terms from the
    model that knows the target product T, the defect direction from the one that learned
    defect c_d^s on other products,

        eps(x_t, t, c_d^s, c_T) = eps_T(x_t, t, c_g, 0) + w_p (eps_T(x_t, t, c_g, c_T) - eps_T(x_t, t, c_g, 0))
                                  + w_d (eps_S(x_t, t, c_d^s, 0) - eps_S(x_t, t, c_g, 0))

    The paper has one multi-product model (eps_T = eps_S, and this is Eq. 4); the finetune
    stage here keeps one checkpoint per (category, defect type), so T's and S's terms come
    from two fine-tunes of the same base. With the same model for both it equals
    :func:`double_free` (tested)."""
    return (target_good_null + w_p * (target_good_product - target_good_null)
            + w_d * (source_defect_null - source_good_null))

