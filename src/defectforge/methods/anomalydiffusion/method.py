"""AnomalyDiffusion: Few-Shot Anomaly Image Generation with Diffusion Model (Hu et al.,
AAAI 2024; code: github.com/sjtuplayer/anomalydiffusion).

Seed: ../shared/seeds/anomalydiffusion-few-shot.txt (method section and Sec. "Experiments").

Notation (the paper's):

    y, m            the normal (anomaly-free) sample and the anomaly mask
    e_a             anomaly embedding: k learned tokens per anomaly type (appearance)
    E, e_s = E(m)   spatial encoder and spatial embedding: n tokens from the mask (location)
    e = {e_a, e_s}  spatial anomaly embedding, the text condition of the diffusion model

Training: masked textual inversion on a *frozen* base model (only e_a and E learn):

    L_dif = || m * (eps - eps_theta(z_t, t, {e_a, e_s})) ||_2^2                            (5)
    e_a*, E* = argmin_{e_a, E} E_{z ~ Enc(x_i), m_i, eps, t} L_dif                          (6)

Sampling: blended diffusion with e as the condition,

    x_{t-1} = p_theta(x_{t-1} | x_t, e) * m + q(y_{t-1} | y_0) * (1 - m)                    (1)

and, in every step, adaptive attention re-weighting (Eq. 7-8): a weight map w_m over the
mask scales the cross-attention to the anomaly tokens, more where the sample is still
close to the normal image (:mod:`defectforge.diffusion.attention`: ``adaptive_weight_map``,
``AttentionReweight``). ``reweight: false`` gives the paper's w/o-AAR ablation.

The re-weighting follows the authors' code (sjtuplayer/anomalydiffusion,
``ldm/models/diffusion/ddim.py`` ``ddim_sampling`` with ``adaptive_mask``, and
``ldm/modules/attention.py`` ``CrossAttention.forward``), not the paper's text, because the
text's formula collapses in practice: w_m = ||m||_1 Softmax(1/d) over the in-mask pixels,
with the distances a real sampler produces, gives one pixel a weight of about ||m||_1 and
every other pixel about 0, so the anomaly tokens are switched off almost everywhere in the
mask (tests/diffusion/test_attention_reweight.py shows it on distances recorded from a run
on Magnetic Tile). The authors' code, followed here:

* replaces the softmax with a linear normalisation of 1/d and clamps the weight to
  [1, 1.5] (``reweight_max``), 1 outside the mask: no token is ever switched off;
* measures d = mean_c (z_t - z_0)^2 between the current sample and the normal latent, in
  latent space, once per step before the UNet call (the text's x^_0 = D(p_theta(z^_0 | z_t))
  would cost a second UNet call per step);
* dilates the mask by r(t) = (t + 100) * 8 / 1000 latent pixels (on a 32-px latent; scaled to
  the latent's width here, ``reweight_dilation``) both for the weights and for the blending
  of Eq. 1, so the region around the defect is free to adapt at the noisy steps;
* multiplies the anomaly tokens' attention *logits* by w_m (softmax after), not the
  attention probabilities.

Where this differs from the paper, plainly:

* E is a small convolutional pyramid (three stride-2 stages) fused top-down in the
  manner of an FPN, pooled to a 4 x 4 grid per level (so the tokens keep the mask's
  location) and mapped by n fully connected heads, one token each; the paper uses
  ResNet-50 + FPN + n FC heads.
* E is trained per anomaly type together with that type's e_a (the finetune stage
  works per defect type); the paper shares one E across all types.
* The tokens e are the UNet's cross-attention context directly. On the tiny profile
  that is what every prompt is; on the pretrained (Stable Diffusion) profile the paper
  puts e_a and e_s into CLIP's token-embedding space and runs the text encoder, which
  this module does not: e lives in the UNet's context space (dimension
  ``cross_attention_dim``).
* L_dif (Eq. 5) is averaged over the masked latent entries (sum / (||m||_1 C)) instead
  of summed: the same minimiser, a step size that does not scale with the mask's area.
* Mask generation (Eq. 9) is not part of this module.

A method that has no trained embedding for a defect type refuses to run (one line
naming the missing folder): an untrained E is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defectforge.diffusion.attention import AttentionReweight, adaptive_weight_map, dilate_mask, reweight_dilation_radius
from defectforge.diffusion.ddim import add_noise, bound_eps, chroma_range, ddim_schedule, ddim_step
from defectforge.diffusion.models import base_reference, resolve_base_reference
from defectforge.diffusion.sampling import check_inputs, is_gray, make_crop, paste_back, soft_masks, to_uint8
from defectforge.errors import DataError, ParamsError
from defectforge.methods.base import BatchItem, DiffusionMethod, GenerationResult
from defectforge.params.methods import AnomalyDiffusionConfig

EMBEDDING_DIR = "anomaly_embedding"  # inside a finetune checkpoint folder
EMBEDDING_WEIGHTS = "anomaly_embedding.safetensors"
EMBEDDING_META = "anomaly_embedding.json"
FORMAT = "defectforge-anomalydiffusion/1"


# ------------------------------------------------------------------ spatial anomaly embedding


class SpatialEncoder(nn.Module):
    """E: mask (B, 1, R, R) in {0, 1} -> spatial embedding e_s (B, n, D).

    Three stride-2 conv stages; 1x1 laterals fused top-down (p3 = l3, p2 = l2 + up(p3),
    p1 = l1 + up(p2)); each level pooled to ``grid`` x ``grid`` (location survives) and
    flattened; n linear heads, one token each.
    """

    def __init__(self, n_tokens: int, dim: int, width: int = 16, grid: int = 4):
        super().__init__()
        self.n_tokens, self.dim, self.width, self.grid = n_tokens, dim, width, grid
        chans = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList()
        c_in = 1
        for c in chans:
            self.stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()))
            c_in = c
        self.laterals = nn.ModuleList([nn.Conv2d(c, width, 1) for c in chans])
        self.heads = nn.ModuleList([nn.Linear(3 * width * grid * grid, dim) for _ in range(n_tokens)])

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        feats, h = [], m.float() * 2 - 1
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        lat = [lateral(f) for lateral, f in zip(self.laterals, feats)]
        fused = [lat[2]]
        for level in (1, 0):  # top-down, FPN-style
            fused.insert(0, lat[level] + F.interpolate(fused[0], size=lat[level].shape[-2:], mode="nearest"))
        pooled = torch.cat([F.adaptive_avg_pool2d(p, self.grid).flatten(1) for p in fused], dim=1)
        return torch.stack([head(pooled) for head in self.heads], dim=1)  # (B, n, D)

    def config(self) -> dict:
        return {"n_tokens": self.n_tokens, "dim": self.dim, "width": self.width, "grid": self.grid}


def spatial_anomaly_embedding(e_a: torch.Tensor, encoder: SpatialEncoder, m: torch.Tensor) -> torch.Tensor:
    """e = {e_a, e_s}: the k anomaly tokens followed by the n tokens E(m); (B, k + n, D)."""
    e_s = encoder(m)
    return torch.cat([e_a[None].expand(e_s.shape[0], -1, -1).to(e_s.dtype), e_s], dim=1)


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
    from defectforge.diffusion.training import _as_rgb, _dihedral, _to_tensor, random_defect_crop

    if not defects:
        raise DataError("anomalydiffusion: no real defect images to learn the anomaly embedding from")
    pairs = []
    for i, (img, m) in enumerate(defects):
        img, m = _as_rgb(np.asarray(img), f"anomaly embedding defect {i}"), np.asarray(m).astype(bool)
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
            img, m = _dihedral(img, m, rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = _to_tensor(crops, masks, dev)
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


def save_anomaly_embedding(folder: str | Path, e_a: torch.Tensor, encoder: SpatialEncoder, *, base: str, defect_type: str, metrics: dict) -> Path:
    """Write ``anomaly_embedding.safetensors`` (e_a, E) and ``anomaly_embedding.json`` (base, shapes, metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"e_a": e_a.detach().cpu().contiguous(), **{f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}}
    save_file(tensors, str(folder / EMBEDDING_WEIGHTS))
    meta = {"format": FORMAT, "base": base_reference(base, folder), "defect_type": defect_type, "encoder": encoder.config(), "trained": True, "metrics": metrics}
    (folder / EMBEDDING_META).write_text(json.dumps(meta, indent=2))
    return folder


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


def load_anomaly_embedding(folder: str | Path, device) -> tuple[torch.Tensor, SpatialEncoder, dict, Path]:
    """(e_a, E, meta, base path or id) from a folder written by :func:`save_anomaly_embedding`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / EMBEDDING_META, folder / EMBEDDING_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise DataError(f"{folder}: no trained anomaly embedding ({EMBEDDING_META} + {EMBEDDING_WEIGHTS}); "
                        "run finetune with finetune.anomaly_embedding: true")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or not meta.get("trained"):
        raise DataError(f"{meta_path}: not a trained anomaly embedding of format {FORMAT}")
    state = load_file(str(weights))
    encoder = SpatialEncoder(**meta["encoder"])
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    return state["e_a"].to(device), encoder.to(device).eval().requires_grad_(False), meta, resolve_base_reference(meta["base"], folder)


# ------------------------------------------------------------------ sampling


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
    row = ADRow(z0, m, e, generator, bound, gray, soft, chroma)
    return sample_anomalydiffusion_batch(comps, [row], steps, reweight=reweight, w_max=w_max, dilation=dilation, log=log)[0]


@dataclass
class ADRow:
    """One sample of :func:`sample_anomalydiffusion_batch`: its tensors (batch 1 each), its own
    generator and options (the arguments of :func:`sample_anomalydiffusion`)."""

    z0: torch.Tensor
    m: torch.Tensor
    e: torch.Tensor
    generator: torch.Generator
    bound: float | tuple = 0.0
    gray: bool = False
    soft: torch.Tensor | None = None
    chroma: tuple | None = None


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


class AnomalyDiffusionMethod(DiffusionMethod):
    """AnomalyDiffusion (see module docstring). ``checkpoint``: a finetune folder with an
    ``anomaly_embedding/`` subfolder, or {defect type: such a folder}."""

    name = "anomalydiffusion"
    config_class = AnomalyDiffusionConfig

    def __init__(self, config: AnomalyDiffusionConfig, checkpoint=None):
        super().__init__(config, checkpoint)
        self._bases: dict[str, object] = {}
        self._embeddings: dict[tuple[str, str], tuple] = {}

    def _folder(self, defect: str) -> Path:
        self._require_models()
        ck = self.models.checkpoint
        if isinstance(ck, dict):
            if defect not in ck:
                raise DataError(f"anomalydiffusion: no checkpoint folder for defect type {defect!r} (have: {sorted(ck)})")
            ck = ck[defect]
        if not isinstance(ck, (str, os.PathLike)):
            raise ParamsError("anomalydiffusion: the checkpoint must be a finetune folder (or a {defect: folder} mapping)")
        return Path(ck) / EMBEDDING_DIR

    def _get(self, defect: str):
        """(frozen base components, e_a, E, meta, folder) for ``defect``; refuses without trained weights."""
        from defectforge.diffusion.models import load_pipeline_components

        folder = self._folder(defect)
        key = (str(folder), defect)
        if key not in self._embeddings:
            from defectforge.diffusion.models import resolve_device

            dev = resolve_device(self.config.device)
            e_a, encoder, meta, base = load_anomaly_embedding(folder, dev)
            if meta.get("defect_type") not in (None, defect):
                raise DataError(f"{folder}: anomaly embedding of {meta.get('defect_type')!r}, asked for {defect!r}")
            if str(base) not in self._bases:
                comps = load_pipeline_components(base, self.config.device)
                comps.unet.eval()
                self._bases[str(base)] = comps
            self._embeddings[key] = (self._bases[str(base)], e_a, encoder, meta, folder)
        return self._embeddings[key]

    def checkpoint_for(self, defect: str) -> str | None:
        """SHA-256 over the frozen base's weights and the trained embedding file."""
        comps, _, _, _, folder = self._get(defect)
        h = hashlib.sha256(comps.checkpoint_sha256().encode())
        h.update((folder / EMBEDDING_WEIGHTS).read_bytes())
        return h.hexdigest()

    @property
    def checkpoint_sha256(self) -> str | None:
        return None  # per defect type: checkpoint_for

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        return self.generate_batch([BatchItem(image, mask, defect, seed)])[0]

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type, one UNet row each in every step (:func:`sample_anomalydiffusion_batch`)."""
        cfg = self.config
        defect = items[0].defect
        comps, e_a, encoder, meta, folder = self._get(defect)
        pixel = not comps.has_decoder
        rows, prepared = [], []
        for it in items:
            image = it.image
            check_inputs(image, it.mask)
            raw = it.mask.astype(bool)
            gen = torch.Generator().manual_seed(int(it.seed))
            crop = make_crop(comps, image, raw, cfg.crop, cfg.context)
            with torch.no_grad():
                z0 = comps.encode(crop.x)
                e = spatial_anomaly_embedding(e_a, encoder, crop.m)  # e = {e_a, E(m)}
            m = comps.latent_mask(crop.m)
            gray = is_gray(image)
            soft, alpha = soft_masks(comps, crop, raw, cfg.feather)
            bound = self.x0_bound(defect, pixel, soft if cfg.feather > 0 else m)
            rows.append(ADRow(z0, m, e, gen, bound=bound, gray=cfg.gray_steps and gray and pixel, soft=soft if cfg.feather > 0 else None,
                              chroma=chroma_range(crop.x) if cfg.chroma_steps and pixel and not gray else None))
            prepared.append((it, raw, crop, gray, alpha, bound, e))
        zs = sample_anomalydiffusion_batch(comps, rows, cfg.steps, reweight=cfg.reweight, w_max=cfg.reweight_max, dilation=cfg.reweight_dilation)
        out = []
        for z, (it, raw, crop, gray, alpha, bound, e) in zip(zs, prepared):
            with torch.no_grad():
                generated = to_uint8(comps.decode(z), gray)
            # background kept: only the (feathered) mask pixels change, as in the other methods
            image = paste_back(it.image, generated, crop.box, only=raw, alpha=alpha if cfg.feather > 0 else None)
            out.append(GenerationResult(
                image=image,
                mask=raw,
                attention=None,
                metadata=self._metadata(comps, crop, defect, it.seed, gray, **self.bound_metadata(defect, bound), reweight=cfg.reweight,
                                        reweight_max=cfg.reweight_max, reweight_dilation=cfg.reweight_dilation,
                                        anomaly_embedding={"folder": str(folder), "tokens": int(e.shape[1]),
                                                           "anomaly_tokens": int(e_a.shape[0]), "spatial_tokens": encoder.n_tokens,
                                                           "training": meta.get("metrics", {})}),
            ))
        return out
