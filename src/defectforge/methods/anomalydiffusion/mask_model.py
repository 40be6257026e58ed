"""AnomalyDiffusion's mask generation (Hu et al., AAAI 2024, Sec. "Mask Generation"; seed:
../shared/seeds/anomalydiffusion-few-shot.txt): the generated target masks of the generate
stage (``generate.target_placement: generated``, for any method).

The paper learns the distribution of a type's real anomaly masks by textual inversion
of a mask embedding e_m (k' = 4 tokens) on the frozen latent diffusion model:

    e_m* = argmin_{e_m} E_{z ~ Enc(m), eps, t} [ || eps - eps_theta(z_t, t, e_m) ||_2^2 ]     (9)

with z_t = sqrt(alpha_t) z + sqrt(1 - alpha_t) eps (DDIM Eq. 1), and samples new masks
with e_m as the condition. Two mask models, one training loop (the loss of Eq. 9):

``textual-inversion``  Eq. 9 as written: only e_m learns, on the frozen base model of
                       the profile (Stable Diffusion on the pretrained profile; the
                       tiny pixel UNet, which has only seen defect-free surfaces, on
                       the tiny one). The mask is drawn as a white-on-black RGB image.
``diffusion``          the tiny profile's alternative: a small
                       unconditional diffusers ``UNet2DModel`` trained from scratch on
                       the masks (one channel), the same loss with every weight
                       learning. A frozen base that never saw a binary image cannot be
                       steered into drawing one by four tokens; measured in
                       experiments/target-masks/generated-masks.md.

Masks are whole-image masks squashed to ``resolution`` x ``resolution``, so the model
learns shape *and* position together (Fray on the edges, blowholes on the face), as the
paper's full-frame masks do; a drawn mask is resized back to the target image's size
and thresholded at the middle of the value range. Training masks are downsampled by
``cover`` (a low-resolution pixel is defect when any pixel under it is: max pooling), so a
crack one source pixel wide stays a connected line at full strength and a pit of a few
pixels stays a dot; ``area`` (a pixel's value is the share of defect it covers) keeps
thin shapes only as faint lines, which the threshold at the middle then drops: a quarter
of Magnetic Tile's blowhole draws came out empty that way (experiments/target-masks/generated-masks.md).
Horizontal and vertical flips augment the few real masks (``flip``; a part whose defects
sit on one side only wants ``flip: false``).

A per-draw shape gate: the model records the range of log10 area share and elongation
(:mod:`defectforge.metrics.mask_shapes`) its training masks span, widened by a margin, and
:meth:`MaskModel.sample` redraws a mask outside it (a fat oval for a type whose real masks
are all lines, a slab ten times the largest real one); when every try is outside, the
caller falls back to an augmented real mask and the row's ``mask_origin`` says so.

A model is written with ``save_pretrained`` conventions: ``mask_model.json`` (kind,
resolution, base reference, training metrics) plus safetensors weights (the UNet
folder of ``UNet2DModel.save_pretrained`` or ``mask_embedding.safetensors``), in
``<finetune checkpoint>/mask_model/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from defectforge.diffusion.ddim import ddim_schedule, ddim_step
from defectforge.diffusion.models import base_reference, resolve_base_reference
from defectforge.errors import DataError

MASK_MODEL_DIR = "mask_model"  # inside a finetune checkpoint folder
MASK_MODEL_META = "mask_model.json"
MASK_EMBEDDING = "mask_embedding.safetensors"
FORMAT = "defectforge-mask-model/1"
KINDS = ("diffusion", "textual-inversion")
DOWNSAMPLES = ("cover", "area")
AREA_MARGIN = 0.25  # decades of area share beyond the real masks' range the gate still accepts
ELONGATION_MARGIN = 0.10


# ------------------------------------------------------------------ data


def masks_to_tensor(masks: list[np.ndarray], resolution: int, downsample: str = "cover") -> torch.Tensor:
    """Whole-image bool masks -> (N, 1, R, R) in [-1, 1]: ``cover`` marks a pixel defect when any
    pixel under it is (max pooling); ``area`` gives the share of defect under it."""
    if downsample not in DOWNSAMPLES:
        raise ValueError(f"mask model downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m).astype(bool)
        if m.ndim != 2 or not m.any():
            raise DataError(f"mask model: training mask {i} is empty or not 2-D ({m.shape})")
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        if downsample == "cover":
            out.append(F.adaptive_max_pool2d(t, (resolution, resolution))[0])
        else:
            out.append(F.interpolate(t, size=(resolution, resolution), mode="area")[0])
    return torch.stack(out) * 2.0 - 1.0


def shape_range(masks: list[np.ndarray]) -> dict[str, list[float]]:
    """The gate of :meth:`MaskModel.sample`: [min, max] of the masks' log10 area share and
    elongation, widened by ``AREA_MARGIN`` decades and ``ELONGATION_MARGIN``."""
    from defectforge.metrics.mask_shapes import elongation

    area = [float(np.log10(np.asarray(m, bool).mean())) for m in masks]
    el = [elongation(np.asarray(m, bool)) for m in masks]
    return {"log10_area": [min(area) - AREA_MARGIN, max(area) + AREA_MARGIN],
            "elongation": [max(0.0, min(el) - ELONGATION_MARGIN), min(1.0, max(el) + ELONGATION_MARGIN)]}


def in_shape_range(mask: np.ndarray, rng: dict | None) -> bool:
    """True for a non-empty mask inside ``rng`` (:func:`shape_range`); no range accepts any non-empty mask."""
    if not mask.any():
        return False
    if not rng:
        return True
    from defectforge.metrics.mask_shapes import elongation

    a, e = float(np.log10(mask.mean())), elongation(mask)
    return rng["log10_area"][0] <= a <= rng["log10_area"][1] and rng["elongation"][0] <= e <= rng["elongation"][1]


def tensor_to_mask(x: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A drawn (1, R, R) mask image in [-1, 1] -> bool (H, W): bilinear resize, threshold at 0."""
    y = F.interpolate(x[None].float(), size=shape, mode="bilinear", align_corners=False)[0, 0]
    return (y > 0).cpu().numpy()


def tiny_mask_unet(resolution: int, seed: int = 0):
    """The ``diffusion`` kind's network: a small unconditional one-channel ``UNet2DModel``."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=resolution, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@dataclass
class MaskModel:
    """A trained mask model of one defect type; :meth:`sample` draws a target mask."""

    kind: str
    resolution: int
    scheduler: object  # diffusers DDIMScheduler (its alphas_cumprod and timesteps)
    unet: torch.nn.Module | None = None  # kind diffusion
    comps: object | None = None  # kind textual-inversion: the frozen base's DiffusionComponents
    e_m: torch.Tensor | None = None  # kind textual-inversion: (k', D)
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.comps.device if self.comps is not None else next(self.unet.parameters()).device

    # z <-> mask image: identity for the pixel mask UNet; Enc / Dec of the frozen base for Eq. 9
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "diffusion":
            return x
        return self.comps.encode(x.expand(-1, 3, -1, -1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "diffusion":
            return z
        return self.comps.decode(z).mean(dim=1, keepdim=True)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        if self.kind == "diffusion":
            return (n, 1, self.resolution, self.resolution)
        s = self.comps.resolution // self.comps.vae_scale_factor
        return (n, self.comps.latent_channels, s, s)

    def x0(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ``diffusion`` kind's network output: the clean mask image x^_0(z_t, t)."""
        return self.unet(z_t, t).sample

    def eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """epsilon_theta(z_t, t, e_m) of Eq. 9; for the ``diffusion`` kind the same quantity
        from its clean-image output, eps = (z_t - sqrt(alpha_t) x^_0) / sqrt(1 - alpha_t)."""
        if self.kind == "diffusion":
            a = self.scheduler.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1).to(z_t.dtype)
            return (z_t - a.sqrt() * self.x0(z_t, t)) / (1 - a).sqrt()
        ones = torch.ones(z_t.shape[0], 1, *z_t.shape[-2:], device=z_t.device, dtype=z_t.dtype)
        return self.comps.eps(z_t, t, self.e_m[None].expand(z_t.shape[0], -1, -1), None, ones)

    @torch.no_grad()
    def sample(self, shape: tuple[int, int], seed: int, *, steps: int = 50, tries: int = 8, gate: bool = True) -> np.ndarray | None:
        """A bool mask of ``shape`` drawn by DDIM (``steps``) from seeded noise; None when
        ``tries`` draws all come out empty or, with ``gate``, outside the training masks'
        shape range (``meta["shape_range"]``; the caller falls back and says so)."""
        rng = self.meta.get("shape_range") if gate else None
        gen = torch.Generator().manual_seed(int(seed))
        sched = ddim_schedule(self.scheduler, steps)
        for _ in range(tries):
            z = torch.randn(self.latent_shape(1), generator=gen).to(self.device)
            for st in sched:
                eps = self.eps(z, torch.tensor([st.t], device=z.device))
                # x0^ bounded to [-1, 1] (a mask image lies there), as DDIMScheduler's clip_sample
                x0 = ((z - (1 - st.alpha_t) ** 0.5 * eps) / st.alpha_t ** 0.5)
                if self.kind == "diffusion":
                    x0 = x0.clamp(-1, 1)
                    eps = (z - st.alpha_t ** 0.5 * x0) / (1 - st.alpha_t) ** 0.5
                z = ddim_step(z, eps, st.alpha_t, st.alpha_prev)
            m = tensor_to_mask(self.decode(z)[0], shape)
            if in_shape_range(m, rng):
                return m
        return None


def _scheduler():
    from diffusers import DDIMScheduler

    # DDPM's linear schedule (1e-4 .. 0.02 over 1000 steps), the usual one for a pixel-space model
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=False, set_alpha_to_one=False)


def save_mask_model(model: MaskModel, folder: str | Path, *, base: str | None = None) -> Path:
    """``mask_model.json`` + safetensors weights (UNet2DModel.save_pretrained, or e_m)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(model.meta)
    if model.kind == "diffusion":
        model.unet.save_pretrained(folder / "unet", safe_serialization=True)
        meta["base"] = None
    else:
        save_file({"e_m": model.e_m.detach().cpu().contiguous()}, str(folder / MASK_EMBEDDING))
        meta["base"] = base_reference(base, folder)
    (folder / MASK_MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def load_mask_model(folder: str | Path, device: str | torch.device = "cpu") -> MaskModel:
    """The model :func:`save_mask_model` wrote; safetensors only (no pickle)."""
    folder = Path(folder)
    meta_path = folder / MASK_MODEL_META
    if not meta_path.is_file():
        raise DataError(f"{folder}: no trained mask model ({MASK_MODEL_META}); run finetune with finetune.mask_model: diffusion "
                        "(or textual-inversion)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or not meta.get("trained") or meta.get("kind") not in KINDS:
        raise DataError(f"{meta_path}: not a trained mask model of format {FORMAT}")
    if meta["kind"] == "diffusion":
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).to(device).eval().requires_grad_(False)
        return MaskModel("diffusion", int(meta["resolution"]), _scheduler(), unet=unet, meta=meta)
    from safetensors.torch import load_file

    from defectforge.diffusion.models import load_pipeline_components

    comps = load_pipeline_components(resolve_base_reference(meta["base"], folder), device=device)
    comps.unet.eval().requires_grad_(False)
    e_m = load_file(str(folder / MASK_EMBEDDING))["e_m"].to(comps.device)
    return MaskModel("textual-inversion", comps.resolution, comps.scheduler, comps=comps, e_m=e_m, meta=meta)
