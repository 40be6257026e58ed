"""AnomalyDiffusion's training: masked textual inversion of the anomaly embedding e_a and the
spatial encoder E on the frozen base model (the finetune stage's ``finetune.anomaly_embedding``).

    L_dif = || m * (eps - eps_theta(z_t, t, {e_a, e_s})) ||_2^2                            (5)
    e_a*, E* = argmin_{e_a, E} E_{z ~ Enc(x_i), m_i, eps, t} L_dif                          (6)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from defectforge.diffusion.ddim import add_noise
from defectforge.errors import DataError
from defectforge.methods.anomalydiffusion.embedding import SpatialEncoder, save_anomaly_embedding, spatial_anomaly_embedding


def masked_diffusion_loss(eps: torch.Tensor, eps_pred: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 5, L_dif = ||m * (eps - eps_theta)||_2^2, averaged over the masked entries."""
    m = m.to(eps.dtype).expand_as(eps)
    return ((m * (eps - eps_pred)) ** 2).sum() / m.sum().clamp_min(1.0)


def train_anomaly_embedding(comps, defects: list[tuple[np.ndarray, np.ndarray]], *, anomaly_tokens: int = 4,
                            spatial_tokens: int = 4, steps: int = 200, lr: float = 5e-3, batch_size: int = 4,
                            seed: int = 0, rotate: bool = True) -> tuple[torch.Tensor, SpatialEncoder, dict]:
    """Masked textual inversion (Eq. 5-6) of e_a and E on the frozen ``comps``.

    The UNet (and autoencoder, prompts) get no gradient and are left exactly as they
    were; returns (e_a (k, D), E, metrics with the loss at the start and the end).
    """
    from defectforge.diffusion.training import as_rgb, dihedral, random_defect_crop, to_tensor

    if not defects:
        raise DataError("anomalydiffusion: no real defect images to learn the anomaly embedding from")
    pairs = []
    for i, (img, m) in enumerate(defects):
        img, m = as_rgb(np.asarray(img), f"anomaly embedding defect {i}"), np.asarray(m).astype(bool)
        if m.shape != img.shape[:2] or not m.any():
            raise DataError(f"anomaly embedding defect {i}: mask {m.shape} is empty or does not match image {img.shape[:2]}")
        pairs.append((img, m))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = int(comps.unet.config.cross_attention_dim)
    res, dev = comps.resolution, comps.device
    comps.unet.requires_grad_(False)
    e_a = nn.Parameter(torch.randn(anomaly_tokens, dim, generator=gen).to(dev) * 0.5)
    encoder = SpatialEncoder(spatial_tokens, dim).to(dev)
    opt = torch.optim.Adam([e_a, *encoder.parameters()], lr=lr)
    n_train = comps.scheduler.config.num_train_timesteps
    alphas = comps.scheduler.alphas_cumprod.to(dev)
    losses = []
    for _ in range(steps):
        crops, masks = [], []
        for _ in range(batch_size):
            img, m = random_defect_crop(*pairs[int(rng.integers(len(pairs)))], res, rng)
            img, m = dihedral(img, m, rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = to_tensor(crops, masks, dev)
        with torch.no_grad():
            z0 = comps.encode(x)
        ml = comps.latent_mask(m)
        t = torch.randint(0, n_train, (batch_size,), generator=gen).to(dev)
        eps = torch.randn(z0.shape, generator=gen).to(dev, z0.dtype)
        z_t = add_noise(z0, eps, alphas[t].view(-1, 1, 1, 1).to(z0.dtype))
        e = spatial_anomaly_embedding(e_a, encoder, m)
        eps_pred = comps.eps(z_t, t, e, None, ml, cond_image=z0)  # token_kinds None: plain cross-attention
        loss = masked_diffusion_loss(eps, eps_pred, ml)  # Eq. (5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    k = max(1, len(losses) // 10)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "anomaly_tokens": anomaly_tokens, "spatial_tokens": spatial_tokens,
               "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])), "n_defects": len(pairs)}
    encoder.requires_grad_(False)
    return e_a.detach(), encoder.eval(), metrics


def fit_anomaly_embedding(base: str | Path, defects, defect_type: str, out_dir: str | Path, *, device: str = "auto", **kw) -> dict:
    """The finetune stage's option: load the frozen ``base``, train e_a and E (Eq. 6), save them in ``out_dir``."""
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.diffusion.training import fixed_threads

    comps = load_pipeline_components(base, device=device)
    comps.unet.eval()
    with fixed_threads():  # the same thread count as the other training loops: reproducible bytes
        e_a, encoder, metrics = train_anomaly_embedding(comps, defects, **kw)
    save_anomaly_embedding(out_dir, e_a, encoder, base=str(base), defect_type=defect_type, metrics=metrics)
    return metrics
