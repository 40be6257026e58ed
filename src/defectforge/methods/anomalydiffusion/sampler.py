"""AnomalyDiffusion's sampler: blended diffusion (Eq. 1) conditioned on the spatial anomaly
embedding, with the adaptive attention re-weighting of Eq. 7-8 in every step.

    x_{t-1} = p_theta(x_{t-1} | x_t, e) * m + q(y_{t-1} | y_0) * (1 - m)                    (1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defectforge.diffusion.ddim import add_noise, bound_eps, ddim_schedule, ddim_step
from defectforge.diffusion.sampling import SampleRow
from defectforge.methods.anomalydiffusion.attention import (
    AttentionReweight,
    adaptive_weight_map,
    dilate_mask,
    reweight_dilation_radius,
)


@torch.no_grad()
def sample_anomalydiffusion(comps, z0: torch.Tensor, m: torch.Tensor, e: torch.Tensor, steps: int,
                            generator: torch.Generator, *, reweight: bool = True, w_max: float = 1.5, dilation: float = 8.0,
                            bound: float | tuple = 0.0, gray: bool = False, soft: torch.Tensor | None = None,
                            chroma: tuple | None = None, log: list | None = None) -> torch.Tensor:
    """Eq. 1 with the adaptive re-weighting of Eq. 7-8 in every step; returns z_0.

    ``z0`` = Enc(y) (latent of the normal crop), ``m`` the mask at latent size, ``e`` the
    spatial anomaly embedding (1, k + n, D). z_T = sqrt(a_T) z0 + sqrt(1 - a_T) noise; per
    step, following the authors' sampler (``ddim_sampling`` with ``adaptive_mask``):

        m_t   = dilate(m, r(t))                                    (``reweight``; else m_t = m)
        w_m   = Eq. 7(z_t, z0, m_t)    in [1, w_max], 1 outside m_t (:func:`adaptive_weight_map`)
        eps   = eps(z_t, e, logits of e scaled by w_m)             (Eq. 8)
        z     = DDIM(z_t, eps)
        z     <- s z + (1 - s) (sqrt(a_{t-1}) z0 + sqrt(1 - a_{t-1}) noise')          (Eq. 1)

    with s = max(``soft`` or m, m_{t-1}): the region left free widens with the dilation at
    the noisy steps and shrinks to m at the end. One UNet call per step (the paper's x^_0
    would need a second one; the authors measure the distance on z_t, see the module
    docstring). Random draws from ``generator`` in that order (z_T's noise, then one per
    step). ``log`` (a list) receives each step's (t, d, w_m), for tests and diagnostics.
    """
    row = ADRow(z0, m, generator, bound, gray, soft, chroma, e=e)
    return sample_anomalydiffusion_batch(comps, [row], steps, reweight=reweight, w_max=w_max, dilation=dilation, log=log)[0]


@dataclass(kw_only=True)
class ADRow(SampleRow):
    """One sample of :func:`sample_anomalydiffusion_batch` (the arguments of
    :func:`sample_anomalydiffusion`): the shared row and its anomaly embedding ``e``."""

    e: torch.Tensor


@torch.no_grad()
def sample_anomalydiffusion_batch(comps, rows: list[ADRow], steps: int, *, reweight: bool = True, w_max: float = 1.5,
                                  dilation: float = 8.0, log: list | None = None) -> list[torch.Tensor]:
    """:func:`sample_anomalydiffusion` for several samples at once; their z_0, in order.

    One UNet call per step with one row per sample (its own e, mask, z_0 and w_m); the
    re-weighting map, the bound, the DDIM step and Eq. 1's blending are computed row by row
    exactly as for one sample, each sample drawing from its own generator, so a sample
    differs from its batch-1 result only by the UNet's floating-point sums over a larger
    batch. ``log`` gets the rows' (t, d, w_m) concatenated along the batch.
    """
    b = len(rows)
    noises = [torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype) for r in rows]
    ss = [r.m if r.soft is None else r.soft for r in rows]
    sched = ddim_schedule(comps.scheduler, steps)
    width = rows[0].z0.shape[-1]
    zs = [add_noise(r.z0, nz, sched[0].alpha_t) for r, nz in zip(rows, noises)]
    cat = (lambda ts: torch.cat(ts)) if b > 1 else (lambda ts: ts[0])  # batch 1 passes its tensors as they are
    e_in, m_in, z0_in = cat([r.e for r in rows]), cat([r.m for r in rows]), cat([r.z0 for r in rows])
    for i, st in enumerate(sched):
        rw = None
        if reweight:
            ws, ds = [], []
            for r, z in zip(rows, zs):
                m_t = dilate_mask(r.m, reweight_dilation_radius(st.t, width, dilation))
                ws.append(adaptive_weight_map(z, r.z0, m_t, w_max))  # Eq. (7), the authors' linear form
                ds.append((m_t * (z - r.z0)) ** 2)
            rw = AttentionReweight(cat(ws))  # Eq. (8): the anomaly tokens' logits times w_m
            if log is not None:
                log.append((st.t, cat(ds).mean(dim=1, keepdim=True), cat(ws)))
        eps = comps.eps(cat(zs), st.t, e_in, None, m_in, cond_image=z0_in, reweight=rw)
        t_prev = sched[i + 1].t if i + 1 < len(sched) else 0
        for k, r in enumerate(rows):
            e = bound_eps(zs[k], eps[k:k + 1], st.alpha_t, r.bound, r.gray, r.chroma)
            z = ddim_step(zs[k], e, st.alpha_t, st.alpha_prev)
            step_noise = torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype)
            s_t = ss[k]
            if reweight:
                s_t = torch.maximum(ss[k], dilate_mask(r.m, reweight_dilation_radius(t_prev, width, dilation)))
            zs[k] = s_t * z + (1 - s_t) * add_noise(r.z0, step_noise, st.alpha_prev)  # Eq. (1)
    return zs
