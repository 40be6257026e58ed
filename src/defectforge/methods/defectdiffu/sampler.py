"""DefectDiffu's sampler: double-free guidance (Sec. 3.3, Eq. 4) inside the target mask, the
zero-shot variant (Sec. 3.6, Eq. 12), and the threshold that binarises the attention (Sec. 3.4).
See the package docstring for the steps and the notation.

    eps = eps(c_g, 0) + w_p (eps(c_g, c_p) - eps(c_g, 0)) + w_d (eps(c_d, 0) - eps(c_g, 0))      (4)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionStoreProtocol
from defectforge.diffusion.ddim import add_noise, bound_eps, ddim_schedule, ddim_step, double_free, zero_shot_guidance
from defectforge.diffusion.prompts import build_context
from defectforge.diffusion.sampling import SampleRow
from defectforge.methods.defectdiffu.config import DefectDiffuConfig

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
    """The contexts of ``conditions`` (default :data:`CONDITIONS`): (n, L, D) and token kinds (n, L).
    A TDIA model (``comps.tdia``) gets each pair's fusion prompt c_f appended."""
    built = [build_context(comps.prompts, d, defect if d == "defect" else None, p, fusion=comps.tdia) for d, p in conditions]
    return torch.cat([c for c, _ in built]).to(comps.device), torch.stack([k for _, k in built]).to(comps.device)


@dataclass
class DoubleFreeRow(SampleRow):
    """One sample of :func:`sample_double_free_batch` (the arguments of :func:`sample_double_free`):
    the shared row, nothing more."""


@torch.no_grad()
def sample_double_free(comps, z0: torch.Tensor, m: torch.Tensor, defect: str, steps: int, w_p: float, w_d: float,
                       generator: torch.Generator, store: AttentionStoreProtocol | None = None, attention_fraction: float = 0.1, *,
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
    row = DoubleFreeRow(z0, m, generator, bound, gray, soft, chroma)
    return sample_double_free_batch(comps, [row], defect, steps, w_p, w_d, store, attention_fraction, source=source)[0]


@torch.no_grad()
def sample_double_free_batch(comps, rows: list[DoubleFreeRow], defect: str, steps: int, w_p: float, w_d: float,
                             store: AttentionStoreProtocol | None = None, attention_fraction: float = 0.1, *, source=None) -> list[torch.Tensor]:
    """:func:`sample_double_free` for several samples of one defect type at once; their z_0, in order.

    Every step makes one UNet call with n rows per sample, sample-major: rows k n .. k n + n - 1
    are sample k's conditions (:data:`CONDITIONS`, n = 3; zero-shot: one call per model with
    its two conditions each). Eq. (4), the bound, the DDIM step and the background reset are
    done row by row exactly as for one sample, each sample drawing from its own generator, so
    a sample differs from its batch-1 result only by the UNet's floating-point sums over a
    larger batch. The members of ``store`` are set to keep the rows
    ``[k n + DEFECT_ROW for k in range(len(rows))]`` (zero-shot: the source call's
    ``ZERO_SHOT_DEFECT_ROW``), so their row k is sample k's attention.
    """
    b = len(rows)
    noises = [torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype) for r in rows]
    mss = [r.m if r.soft is None else r.soft for r in rows]
    ctx, kinds = contexts(comps, defect) if source is None else contexts(comps, None, ZERO_SHOT_TARGET)
    n = ctx.shape[0]
    if source is not None:
        if source.resolution != comps.resolution or source.latent_channels != comps.latent_channels:
            raise ValueError("zero-shot: the source and target models must be fine-tunes of the same base (resolution, latent channels)")
        s_ctx, s_kinds = contexts(source, defect, ZERO_SHOT_SOURCE)
    members = store.members() if store is not None else []
    for s in members:
        s.rows = [k * n + (DEFECT_ROW if source is None else ZERO_SHOT_DEFECT_ROW) for k in range(b)]
    sched = ddim_schedule(comps.scheduler, steps)
    first_captured = min(len(sched) - 1, int(round((1 - attention_fraction) * len(sched))))  # at least the last step

    def per_sample(ts):  # every sample's tensor under each of the n conditions; batch 1 passes the view itself
        return torch.cat([t.expand(n, -1, -1, -1) for t in ts]) if b > 1 else ts[0].expand(n, -1, -1, -1)

    m_in, cond = per_sample([r.m for r in rows]), per_sample([r.z0 for r in rows])
    ctx_in, kinds_in = (ctx.repeat(b, 1, 1), kinds.repeat(b, 1)) if b > 1 else (ctx, kinds)
    if source is not None:
        s_ctx_in, s_kinds_in = (s_ctx.repeat(b, 1, 1), s_kinds.repeat(b, 1)) if b > 1 else (s_ctx, s_kinds)
    zs = [add_noise(r.z0, nz, sched[0].alpha_t) for r, nz in zip(rows, noises)]
    for i, st in enumerate(sched):
        for s in members:
            s.active = i >= first_captured
            s.next_step()
        z_in = per_sample(zs)
        if source is None:
            eps = comps.eps(z_in, st.t, ctx_in, kinds_in, m_in, cond_image=cond, store=store)
        else:
            e_t = comps.eps(z_in, st.t, ctx_in, kinds_in, m_in, cond_image=cond)
            e_s = source.eps(z_in, st.t, s_ctx_in, s_kinds_in, m_in, cond_image=cond, store=store)
        for k, r in enumerate(rows):
            z = zs[k]
            if source is None:
                e = double_free(eps[k * n:k * n + 1], eps[k * n + 1:k * n + 2], eps[k * n + 2:k * n + 3], w_p, w_d)  # Eq. (4)
            else:
                e = zero_shot_guidance(e_t[k * n:k * n + 1], e_t[k * n + 1:k * n + 2], e_s[k * n:k * n + 1], e_s[k * n + 1:k * n + 2],
                                       w_p, w_d)  # Eq. (12)
            e = bound_eps(z, e, st.alpha_t, r.bound, r.gray, r.chroma)
            z = ddim_step(z, e, st.alpha_t, st.alpha_prev)
            step_noise = torch.randn(r.z0.shape, generator=r.generator).to(r.z0.device, r.z0.dtype)
            zs[k] = mss[k] * z + (1 - mss[k]) * add_noise(r.z0, step_noise, st.alpha_prev)  # background: the input's
    return zs


def attention_mask(attention: np.ndarray, target: np.ndarray, cfg: DefectDiffuConfig) -> tuple[np.ndarray, float]:
    """Step 6: (binary mask inside ``target``, threshold) from the averaged attention."""
    values = attention[target]
    t = iterative_threshold(values, cfg.threshold_tol) if cfg.threshold == "iterative" else cfg.threshold_value
    return (attention > t) & target, float(t)
