"""Training of AnomalyDiffusion's mask model (Eq. 9; the model, its sampling and its files:
:mod:`defectforge.methods.anomalydiffusion.mask_model`), kept apart so that the generate stage,
which only loads and samples mask models, does not depend on the training loop's code.

    e_m* = argmin_{e_m} E_{z ~ Enc(m), eps, t} [ || eps - eps_theta(z_t, t, e_m) ||_2^2 ]     (9)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from defectforge.diffusion.ddim import add_noise
from defectforge.methods.anomalydiffusion.mask_model import (
    FORMAT,
    KINDS,
    MaskModel,
    _scheduler,
    masks_to_tensor,
    save_mask_model,
    shape_range,
    tiny_mask_unet,
)


def _flips(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each mask flipped left-right and / or up-down with probability 1/2 (exact, no interpolation)."""
    lr = torch.rand(x.shape[0], generator=gen) < 0.5
    ud = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(lr.view(-1, 1, 1, 1), x.flip(-1), x)
    return torch.where(ud.view(-1, 1, 1, 1), x.flip(-2), x)


# ------------------------------------------------------------------ the two mask models


def eq9_loss(model: MaskModel, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Eq. 9's objective for one batch, z_t by DDIM Eq. 1 (mean over entries).

    ``textual-inversion``: || eps - eps_theta(z_t, t, e_m) ||_2^2, as written.
    ``diffusion``: || z_0 - x^_0(z_t, t) ||_2^2, which is Eq. 9 weighted by (1 - alpha_t) / alpha_t
    (eps - eps^ = sqrt(alpha_t / (1 - alpha_t)) (x^_0 - z_0)): a network trained from scratch
    on a few dozen masks learns the clean image in a few hundred steps, and its eps at high
    noise otherwise blows up into speckle (tests/masks/test_generated_masks.py measures both).
    """
    a = alphas[t].view(-1, 1, 1, 1).to(z0.dtype)
    z_t = add_noise(z0, eps, a)
    if model.kind == "diffusion":
        return F.mse_loss(model.x0(z_t, t), z0)
    return F.mse_loss(model.eps(z_t, t), eps)


def train_mask_model(masks: list[np.ndarray], *, kind: str = "diffusion", comps=None, resolution: int = 64, tokens: int = 4,
                     steps: int = 1500, lr: float | None = None, batch_size: int = 8, flip: bool = True, seed: int = 0,
                     downsample: str = "cover", progress: bool = False) -> MaskModel:
    """Fit a mask model of ``kind`` on one type's real training masks (the loss of Eq. 9).

    ``textual-inversion`` needs ``comps`` (the frozen base; its UNet gets no gradient)
    and trains e_m only; ``diffusion`` trains a :func:`tiny_mask_unet` from scratch.
    """
    if kind not in KINDS:
        raise ValueError(f"mask model kind must be one of {KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "textual-inversion":
        if comps is None:
            raise ValueError("a textual-inversion mask model needs the frozen base model's components")
        resolution = comps.resolution
        comps.unet.requires_grad_(False)
        dim = int(comps.unet.config.cross_attention_dim)
        e_m = torch.nn.Parameter(torch.randn(tokens, dim, generator=gen).to(comps.device) * 0.5)
        model = MaskModel(kind, resolution, comps.scheduler, comps=comps, e_m=e_m)
        params, lr = [e_m], lr or 5e-3
    else:
        model = MaskModel(kind, resolution, _scheduler(), unet=tiny_mask_unet(resolution, seed))
        model.unet.train()
        params, lr = list(model.unet.parameters()), lr or 1e-3
    data = masks_to_tensor(masks, resolution, downsample).to(model.device)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    alphas = model.scheduler.alphas_cumprod.to(model.device)
    n_train = model.scheduler.config.num_train_timesteps
    losses = []
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="mask model", disable=not progress, leave=False):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x = data[idx]
        if flip:
            x = _flips(x, gen)
        with torch.no_grad():
            z0 = model.encode(x)  # z ~ Enc(m) of Eq. 9 (the mask image itself for the diffusion kind)
        t = torch.randint(0, n_train, (batch_size,), generator=gen).to(model.device)
        eps = torch.randn(z0.shape, generator=gen).to(model.device, z0.dtype)
        loss = eq9_loss(model, z0, t, eps, alphas)  # Eq. (9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    k = max(1, len(losses) // 10)
    model.meta = {"format": FORMAT, "kind": kind, "resolution": resolution, "tokens": tokens if kind == "textual-inversion" else None,
                  "flip": flip, "downsample": downsample, "shape_range": shape_range(masks), "trained": True,
                  "metrics": {"steps": steps, "batch_size": batch_size, "lr": lr, "n_masks": len(masks), "seed": seed,
                              "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:]))}}
    if model.unet is not None:
        model.unet.eval().requires_grad_(False)
    if model.e_m is not None:
        model.e_m = model.e_m.detach()
    return model


# ------------------------------------------------------------------ disk


def fit_mask_model(base: str | Path, masks: list[np.ndarray], out_dir: str | Path, *, kind: str, device: str = "auto", **kw) -> dict:
    """The finetune stage's option: fit one type's mask model and save it in ``out_dir``; its metrics."""
    from defectforge.diffusion.training import fixed_threads

    comps = None
    if kind == "textual-inversion":
        from defectforge.diffusion.models import load_pipeline_components

        comps = load_pipeline_components(base, device=device)
        comps.unet.eval()
    with fixed_threads():  # the same thread count as the other training loops: reproducible bytes
        model = train_mask_model(masks, kind=kind, comps=comps, **kw)
    save_mask_model(model, out_dir, base=str(base) if kind == "textual-inversion" else None)
    return model.meta["metrics"]
