"""Training loops: ``pretrain`` (tiny profile, defect-free crops) and ``finetune``
(per defect type, the DDIM-inversion paper's disentangled training, Sec. 3.1).

Both minimise Eq. (5) with the masked noising of Eq. (6)-(7) and the masked
cross-attention of Eq. (10)-(11) (:mod:`defectforge.diffusion.attention`):

* ``pretrain`` teaches the tiny UNet to paint *normal* content inside random masks:
  C_1 = [C_good, C_bg] for z_t, C_2 = [C_m, C_bg] for z_t^m.
* ``finetune`` learns one defect type from a few (image, mask) pairs: C_1 = [C_def,
  C_bg]. The UNet is fine-tuned DreamBooth-style (``mode="unet"``, as the paper) or
  through LoRA adapters (``mode="lora"``, peft). For the tiny profile the new
  defect tokens C_def are learned as well (the frozen CLIP encoder of the
  pretrained profile needs no new tokens: its prompts name the category and the
  unified defect type, :mod:`defectforge.diffusion.prompts`; ``category`` is stored
  in the folder so generation builds the same prompts).
  DreamBooth's prior preservation: when normal images are given, a share of each
  batch (``prior_fraction``, default one half as DreamBooth's equal class batch) is
  normal crops with random masks and C_good, so the "good" baseline of the
  defect-vs-background guidance keeps meaning normal.

Each step evaluates the two branches (z_t, C_1) and (z_t^m, C_2) in one batched
UNet call. Options of ``finetune``: ``loss_norm`` ("all" | "area", how Eq. 5's squared
norms are normalised, see :mod:`defectforge.diffusion.losses`) and ``attention_loss``
(weight of the attention loss that trains the defect tokens' joint-softmax share, the
input of Eq. 13, towards m'; see :class:`~defectforge.diffusion.attention.AttentionShareCollector`).
DefectDiffu's Algorithm 1 (double-free condition dropout, ../shared/seeds/defectdiffu-consistency-modeling.txt
Sec. 3.3): with ``cond_dropout_product`` = p_1 and ``cond_dropout_defect`` = p_2 each C_1 row's
conditions are dropped as :func:`double_free_dropout` says (product c_p = C_bg -> the null
tokens, defect c_d -> good), so the null condition and eps(c_d, 0) that Eq. 4 evaluates at
sampling are trained; on the tiny profile the null tokens are learned with the defect tokens.

``aal`` adds DefectDiffu's adaptive attention-enhanced loss (Eq. 7-10,
:func:`adaptive_attention_loss`) on the C_1 rows with C_def: Eq. (11)'s objective without
its mask-module term, whose counterpart here is the attention loss.

Outputs: safetensors weights, ``training_curve.csv`` (step, loss, matching,
regulariser, and attention when that loss is on: a DVC plot) and a metrics dict.

Reproducibility (``docs/reproducibility.md``): both loops run with
:data:`TRAIN_THREADS` torch threads whatever ``OMP_NUM_THREADS`` or the core count
say (float reductions split over threads round differently), and the files they write
hold no wall-clock values: the metrics dict returned keeps ``seconds`` and
``seconds_per_step`` (:data:`TIMING_KEYS`) for the log, the files get
:func:`file_metrics` of it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import contextlib
import importlib.util
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.diffusion.attention import AttentionShareCollector, StoreGroup, TokenMapStore
from defectforge.diffusion.mask_module import MASK_MODULE_DIR, MaskGenerationModule, mask_features, mask_loss, module_input
from defectforge.diffusion.losses import NORMS, disentangled_loss, masked_noising
from defectforge.diffusion.models import (
    FINETUNE_FILE,
    DiffusionComponents,
    base_reference,
    build_tiny_components,
    load_pipeline_components,
    resolve_device,
    save_tiny,
)
from defectforge.errors import DataError, ParamsError
from defectforge.masks.crop import crop_box, resize_image, resize_mask

CURVE_FILE = "training_curve.csv"
# Torch intra-op threads of a training loop unless told otherwise (pretrain: ``pretrain.threads``).
# The result of a float reduction depends on how it is split over threads, i.e. on this
# number, not on the machine's cores: a fixed count gives the same weights on every machine
# with the same wheels and CPU instruction set. Finetune and the anomaly embedding keep one
# thread per process (finetune.workers runs defect types side by side instead).
TRAIN_THREADS = 1
# wall-clock values: returned and logged, never written into a stage's output files
TIMING_KEYS = ("seconds", "seconds_per_step")


def file_metrics(metrics: dict) -> dict:
    """``metrics`` without the wall-clock entries: what goes into DVC-tracked files."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@contextmanager
def fixed_threads(n: int = TRAIN_THREADS):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log_timing(desc: str, metrics: dict, threads: int = TRAIN_THREADS) -> None:
    print(f"{desc}: {metrics['steps']} steps in {metrics['seconds']} s ({metrics['seconds_per_step']} s/step, {threads} thread{'s' if threads > 1 else ''})",
          file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data
def _as_rgb(img: np.ndarray, where: str) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"{where}: expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    return img


def random_mask(res: int, rng: np.random.Generator) -> np.ndarray:
    """A random blob or stroke covering roughly 1-25 % of a res x res crop."""
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    m = np.zeros((res, res), bool)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.15 * res, 0.85 * res, size=2)
        if rng.random() < 0.6:  # ellipse (pit, blowhole, stain)
            a, b = rng.uniform(0.04 * res, 0.22 * res, size=2)
            th = rng.uniform(0, np.pi)
            u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
            v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
            m |= (u / a) ** 2 + (v / b) ** 2 <= 1
        else:  # stroke (crack, scratch): a random walk of discs
            r = rng.uniform(0.02 * res, 0.05 * res)
            ang = rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(6, 16))):
                m |= (x - cx) ** 2 + (y - cy) ** 2 <= r * r
                ang += rng.normal(0, 0.5)
                cy = float(np.clip(cy + 0.04 * res * np.sin(ang), 0, res - 1))
                cx = float(np.clip(cx + 0.04 * res * np.cos(ang), 0, res - 1))
    return m


def _dihedral(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rotate: bool) -> tuple[np.ndarray, np.ndarray]:
    """A random flip and quarter turn of a training crop: exact (no interpolation), so the
    surface texture the model learns is never smoothed (unlike :mod:`defectforge.masks.augment`)."""
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    if rotate:
        k = int(rng.integers(0, 4))
        img, mask = np.rot90(img, k), np.rot90(mask, k)
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def random_normal_crop(images: list[np.ndarray], res: int, rng: np.random.Generator) -> np.ndarray:
    img = images[int(rng.integers(len(images)))]
    h, w = img.shape[:2]
    if h < res or w < res:
        return resize_image(img, (res, res))
    top, left = int(rng.integers(0, h - res + 1)), int(rng.integers(0, w - res + 1))
    return img[top : top + res, left : left + res]


def random_defect_crop(image: np.ndarray, mask: np.ndarray, res: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop around the defect with a random shift that keeps the defect inside when it fits."""
    box = crop_box(mask, res, context=1.2)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    lo_t, hi_t = max(0, ys.max() + 1 - box.height), min(ys.min(), h - box.height)
    lo_l, hi_l = max(0, xs.max() + 1 - box.width), min(xs.min(), w - box.width)
    top = int(rng.integers(lo_t, hi_t + 1)) if hi_t >= lo_t else box.top
    left = int(rng.integers(lo_l, hi_l + 1)) if hi_l >= lo_l else box.left
    sl = (slice(top, top + box.height), slice(left, left + box.width))
    return resize_image(image[sl], (res, res)), resize_mask(mask[sl], (res, res))


def _to_tensor(imgs: list[np.ndarray], masks: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    return x.to(device), m.to(device)


# ------------------------------------------------------------------ DefectDiffu Algorithm 1
def double_free_dropout(inside: list[str], p1: float, p2: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Algorithm 1 (double-free) for a batch: ``inside[i]`` is row i's defect condition
    ("defect" = c_d^r or "good"); returns (defect condition, product condition) per row,
    the product condition being "bg" (c_p) or "null" (0):

        1: with probability p_1, c_p -> 0
        2: if c_d^r is not good:
        3:     with probability p_2, c_d -> good
        4:     with probability p_1, c_p -> 0

    As written, a defect row has its product condition dropped by line 1 or line 4, i.e.
    with probability 1 - (1 - p_1)^2. Three uniform draws per row, in that order."""
    out_d, out_p = [], []
    for c_d in inside:
        c_p = "bg"
        if rng.random() < p1:  # line 1
            c_p = "null"
        if c_d != "good":  # line 2
            if rng.random() < p2:  # line 3
                c_d = "good"
            if rng.random() < p1:  # line 4
                c_p = "null"
        out_d.append(c_d)
        out_p.append(c_p)
    return out_d, out_p


# ------------------------------------------------------------------ DefectDiffu AAL, Eq. 7-10
AAL_RANGE = (2.0, 8.0)  # Eq. (9): R = min(max(Rat, 2), 8)


def adaptive_attention_loss(maps: list[torch.Tensor], mask: torch.Tensor, eps_pred: torch.Tensor, eps: torch.Tensor,
                            alpha: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """DefectDiffu's adaptive attention-enhanced loss (../shared/seeds/defectdiffu-consistency-modeling.txt Sec. 3.5).

    ``maps``: the defect tokens' cross-attention maps, one (B, h_l, w_l) tensor per layer
    (their share of the joint softmax, Eq. 5); ``mask`` (B, 1, H, W) the real mask at the
    latent size of ``eps_pred`` / ``eps`` (B, C, H, W). Returns (loss_d, R (B,)).

        Map  = 1/M sum_i softmax(Q_i K^T / sqrt(d))                                   (7)
        Rat  = sum (1 - mask) Map / (sum mask Map + alpha)                            (8)
        R    = clamp(Rat, 2, 8)                                                       (9)
        loss_d = R || mask eps_theta - mask eps ||^2                                  (10)

    The layers' maps differ in size: each is upsampled (bilinear) to the largest one before
    the mean of Eq. 7, and the mask is scaled to that size (area) for Eq. 8, as the paper
    scales the real mask to Map. R is a weight: no gradient flows through it. The squared
    norm of Eq. 10 is the mean over the row's elements (as Eq. 5's "all" norm), averaged over rows.
    """
    if not maps:
        raise RuntimeError("adaptive_attention_loss: no cross-attention maps were collected")
    size = max((mp.shape[-2:] for mp in maps), key=lambda hw: hw[0] * hw[1])
    att = torch.stack([F.interpolate(mp.detach().float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                       for mp in maps]).mean(0)  # Eq. (7)
    small = F.interpolate(mask.float(), size=size, mode="area")[:, 0]
    rat = ((1 - small) * att).sum((1, 2)) / ((small * att).sum((1, 2)) + alpha)  # Eq. (8)
    r = rat.clamp(*AAL_RANGE)  # Eq. (9)
    per_row = ((mask * eps_pred - mask * eps) ** 2).flatten(1).mean(1)
    return (r * per_row).mean(), r  # Eq. (10)


# ------------------------------------------------------------------ one step
def disentangled_step(
    comps: DiffusionComponents,
    x: torch.Tensor,
    mask: torch.Tensor,
    inside: list[str],
    defect: str | None,
    generator: torch.Generator,
    *,
    loss_norm: str = "all",
    attention_loss: float = 0.0,
    attention_rows: str = "defect",
    outside: list[str] | None = None,
    aal: bool = False,
    aal_alpha: float = 1e-3,
    mask_module=None,
    mask_weight: float = 0.0,
    trimap: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. (5)-(7) on a batch: x (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1};
    ``inside[i]`` is "defect" or "good" (the inside tokens of C_1 for row i), ``outside[i]``
    "bg" (default) or "null" (its outside tokens: DefectDiffu's c_p or the null condition).

    ``attention_loss`` > 0 adds that weight times the attention loss on the rows of
    C_1 whose inside tokens are C_def ("defect"), and also on every C_2 row
    ("defect+mask"); the result then has an "attention" entry.

    ``mask_module`` (DefectDiffu's mask generation module) with ``mask_weight`` = lambda adds
    lambda loss_m (Eq. 6, 11) on the C_def rows: the module reads those rows' per-token
    attention maps (with their gradient, so the UNet's attention learns too) and predicts
    the real mask's features; the result then has a "mask" entry. Under TDIA
    (``comps.tdia``) the contexts carry the fusion prompt and each part sees its own prompt.

    ``trimap`` (B, 1, H, W) in {0, 1, 2} with ``comps.controlnet``: AdaBLDM's trimap condition
    (diffusion/control.py) on the C_1 rows; the C_2 rows (background inside m) see the same
    trimap with the defect region marked as object."""
    b = x.shape[0]
    with torch.no_grad():
        z0 = comps.encode(x)
    m = comps.latent_mask(mask)
    t = torch.randint(0, comps.scheduler.config.num_train_timesteps, (b,), generator=generator).to(z0.device)
    alpha = comps.scheduler.alphas_cumprod.to(z0.device)[t].view(b, 1, 1, 1).to(z0.dtype)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    z_t, z_t_m = masked_noising(z0, eps, m, alpha)  # Eq. (6), (7)

    if outside is None:
        c1 = [comps.context(k, defect) for k in inside]
    else:
        c1 = [comps.context(k, defect, o) for k, o in zip(inside, outside)]
    c2, kinds2 = comps.context("mask")
    ctx = torch.cat([c for c, _ in c1] + [c2] * b, dim=0)
    kinds = torch.stack([k for _, k in c1] + [kinds2] * b, dim=0)
    z_in = torch.cat([z_t, z_t_m], dim=0)
    # the inpainting channels carry the clean background (1 - m) * z_0 for both branches
    collector = None
    defect_rows = [i for i, k in enumerate(inside) if k == "defect"]
    if attention_loss > 0 or aal:
        rows = list(defect_rows)  # first: AAL reads the defect rows' maps from the front
        if attention_loss > 0 and attention_rows == "defect+mask":
            rows += list(range(b, 2 * b))
        collector = AttentionShareCollector(rows) if rows else None
    token_maps = TokenMapStore(defect_rows, with_grad=True) if mask_module is not None and mask_weight > 0 and defect_rows else None
    store = StoreGroup(collector, token_maps) if token_maps is not None else collector
    control = None
    if trimap is not None:
        from defectforge.diffusion.control import trimap_condition

        no_defect = torch.where(trimap == 2, torch.ones_like(trimap), trimap)
        control = trimap_condition(torch.cat([trimap, no_defect]), x.shape[-1])
    eps_pred = comps.eps(z_in, torch.cat([t, t]), ctx, kinds, torch.cat([m, m]), cond_image=torch.cat([z0, z0]), store=store,
                         control=control)
    eps_def, eps_bg = eps_pred[:b], eps_pred[b:]
    out = disentangled_loss(eps, eps_def, eps_bg, m, norm=loss_norm)  # Eq. (5)
    if attention_loss > 0:
        att = collector.loss() if collector is not None else torch.zeros((), device=out["loss"].device)
        out["attention"] = att
        out["loss"] = out["loss"] + attention_loss * att
    if aal:  # DefectDiffu Eq. (7)-(10) on the C_def rows, added as in Eq. (11)
        if collector is not None and defect_rows:
            h0, w0 = m.shape[-2:]
            n_d = len(defect_rows)
            maps = []
            for share in collector.shares:  # (rows, N) per layer -> (n_d, h, w)
                sc = math.sqrt(h0 * w0 / share.shape[1])
                maps.append(share[:n_d].reshape(n_d, round(h0 / sc), round(w0 / sc)))
            idx = torch.tensor(defect_rows, device=eps.device)
            loss_d, _ = adaptive_attention_loss(maps, m[idx], eps_def[idx], eps[idx], aal_alpha)
        else:
            loss_d = torch.zeros((), device=out["loss"].device)
        out["aal"] = loss_d
        out["loss"] = out["loss"] + loss_d
    if mask_module is not None and mask_weight > 0:  # DefectDiffu Eq. (6), the lambda term of Eq. (11)
        if token_maps is not None:
            idx = torch.tensor(defect_rows, device=eps.device)
            m_f = mask_module(module_input(token_maps.steps[-1], tuple(z0.shape[-2:])))  # M_f
            loss_m = mask_loss(m_f, mask_features(comps, mask[idx]))  # vs Mask_f
        else:
            loss_m = torch.zeros((), device=out["loss"].device)
        out["mask"] = loss_m
        out["loss"] = out["loss"] + mask_weight * loss_m
    return out


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _write_curve(path: Path, rows: list[tuple], header: list[str] | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header or ["step", "loss", "matching", "regulariser", "attention"][: len(rows[0]) if rows else 4])
        w.writerows(rows)
    os.replace(tmp, path)


def _metrics(rows, seconds, steps, batch_size, n_params, extra) -> dict:
    tail = rows[-5:] if rows else []
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, steps), 4),
        "final_loss": round(float(np.mean([r[1] for r in tail])), 6) if tail else None,
        "trainable_parameters": n_params,
        **extra,
    }


# ------------------------------------------------------------------ pretrain
def pretrain(
    images: list[np.ndarray],
    out_dir: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    rotate: bool = True,
    device: str = "auto",
    progress: bool = True,
    threads: int = TRAIN_THREADS,
) -> dict:
    """Train the tiny profile from scratch on random crops of defect-free ``images``.

    Writes ``out_dir`` (``model_index.json``, ``unet/``, ``scheduler/``,
    ``prompt_encoder/``, ``training_curve.csv``) and returns metrics. ``batch_size``
    is per branch: each step runs 2 x batch_size UNet rows (z_t and z_t^m). ``threads``:
    torch intra-op threads; the weights depend on this number (how float sums are split),
    not on the machine's cores, so a fixed value gives the same bytes everywhere.
    """
    if not images:
        raise DataError("pretrain: no defect-free images given")
    if steps < 1 or batch_size < 1:
        raise ParamsError(f"pretrain: steps and batch_size must be >= 1 (got {steps}, {batch_size})")
    images = [_as_rgb(im, f"pretrain image {i}") for i, im in enumerate(images)]
    comps = build_tiny_components(seed=seed, device=resolve_device(device))
    res = comps.resolution
    rng = np.random.default_rng(seed)

    def make_batch():
        crops, masks = [], []
        for _ in range(batch_size):
            img, m = _dihedral(random_normal_crop(images, res, rng), random_mask(res, rng), rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = _to_tensor(crops, masks, comps.device)
        return x, m, ["good"] * batch_size

    comps.unet.train()
    params = list(comps.unet.parameters()) + list(comps.prompts.parameters())
    rows, seconds = _loop_groups(comps, params, [{"params": params, "lr": lr}], 0.0, steps, make_batch, None, seed, progress, "pretrain", threads=threads)
    comps.unet.eval()
    out = Path(out_dir)
    n_params = sum(p.numel() for p in comps.unet.parameters())
    metrics = _metrics(rows, seconds, steps, batch_size, sum(p.numel() for p in params), {"unet_parameters": n_params, "resolution": res, "threads": threads})
    save_tiny(comps, out, extra={"pretrain": file_metrics(metrics)})
    _write_curve(out / CURVE_FILE, rows)
    if progress:
        _log_timing("pretrain", metrics, threads)
    return metrics


# ------------------------------------------------------------------ finetune
def finetune(
    base: str | Path,
    defects: list[tuple[np.ndarray, np.ndarray]],
    defect_type: str,
    out_dir: str | Path,
    *,
    normals: list[np.ndarray] | None = None,
    mode: str = "unet",
    steps: int = 400,
    batch_size: int = 8,
    lr: float | None = None,
    token_lr: float = 5e-3,
    lora_rank: int = 4,
    prior_fraction: float = 0.5,
    loss_norm: str = "all",
    attention_loss: float = 0.0,
    attention_rows: str = "defect",
    cond_dropout_product: float = 0.0,
    cond_dropout_defect: float = 0.0,
    aal: bool = False,
    aal_alpha: float = 1e-3,
    tdia: bool = False,
    mask_module: float = 0.0,
    mask_module_lr: float = 1e-3,
    trimap_control: bool = False,
    trimap_control_steps: int | None = None,
    rotate: bool = True,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    category: str | None = None,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
) -> dict:
    """Fine-tune ``base`` (tiny dir, diffusers SD dir or hub id) on one defect type.

    ``category``: the product the defect type belongs to, DefectDiffu's {product name} in the
    pretrained profile's prompts c_p and c_f (recorded in ``defectforge_finetune.json``).

    ``defects``: (uint8 image, bool mask) pairs. Writes ``out_dir`` with
    ``defectforge_finetune.json``, ``unet/`` (mode "unet") or
    ``lora/pytorch_lora_weights.safetensors`` (mode "lora"), ``prompt_encoder/``
    (tiny) and ``training_curve.csv``; returns metrics. Default ``lr``: 1e-4 for
    "unet" (DreamBooth), 1e-3 for "lora".

    DefectDiffu options: ``tdia`` routes cross-attention by TDIA part with the fusion
    prompt (:func:`~defectforge.diffusion.attention.tdia_parts`; recorded in the folder, so
    sampling routes the same way); ``mask_module`` = lambda > 0 trains the mask generation
    module with loss_m (Eq. 6, 11) at ``mask_module_lr`` and saves it in ``mask_module/``.

    AdaBLDM option: ``trimap_control`` trains a trimap ControlNet (diffusion/control.py) after
    the UNet, for ``trimap_control_steps`` (default ``steps``) with the UNet and tokens frozen,
    and saves it in ``controlnet/``; the UNet and tokens are the bytes they are without it.

    Memory options (docs/gpu-memory-plan.md): ``precision`` "bf16" / "fp16" runs each step's
    forward pass under ``torch.autocast`` (mixed precision: the weights, gradients and AdamW
    states stay fp32, the saved checkpoint too; "fp16" is CUDA-only and scales the loss with a
    ``GradScaler``; "bf16" also runs on CPU); with ``mode="lora"`` the frozen base is loaded in
    that dtype and only the adapters are fp32. ``gradient_checkpointing`` recomputes the UNet
    blocks' activations in the backward pass instead of keeping them
    (``unet.enable_gradient_checkpointing()``). ``optimizer`` "adamw8bit": bitsandbytes'
    AdamW8bit (2 bytes of state per parameter instead of 8; an optional package). All three
    leave the defaults ("fp32", off, "adamw") the bytes they were.
    """
    if optimizer not in ("adamw", "adamw8bit"):
        raise ParamsError(f"finetune.optimizer: must be 'adamw' or 'adamw8bit', got {optimizer!r}")
    if optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ParamsError("finetune.optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes)")
    if precision not in PRECISIONS:
        raise ParamsError(f"finetune.precision: must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if mode not in ("unet", "lora"):
        raise ParamsError(f"finetune.mode: must be 'unet' or 'lora', got {mode!r}")
    if not defects:
        raise DataError(f"finetune: no real defect images given for {defect_type!r}")
    if not 0 <= prior_fraction < 1:
        raise ParamsError(f"finetune.prior_fraction: must be in [0, 1), got {prior_fraction}")
    if loss_norm not in NORMS:
        raise ParamsError(f"finetune.loss_norm: must be one of {NORMS}, got {loss_norm!r}")
    if attention_loss < 0:
        raise ParamsError(f"finetune.attention_loss: must be >= 0, got {attention_loss}")
    if aal and not aal_alpha > 0:
        raise ParamsError(f"finetune.aal_alpha: must be > 0, got {aal_alpha}")
    for key, p in (("cond_dropout_product", cond_dropout_product), ("cond_dropout_defect", cond_dropout_defect)):
        if not 0 <= p < 1:
            raise ParamsError(f"finetune.{key}: must be in [0, 1), got {p}")
    if tdia and (attention_loss > 0 or aal):
        raise ParamsError("finetune.tdia: cannot be combined with attention_loss or aal (both read the defect tokens' share of "
                          "the joint softmax over [c_d, c_p], which TDIA's per-part softmax does not have)")
    if mask_module < 0 or mask_module_lr <= 0:
        raise ParamsError(f"finetune.mask_module: must be >= 0 (lambda of Eq. 11), got {mask_module}; mask_module_lr > 0")
    if attention_rows not in ("defect", "defect+mask"):
        raise ParamsError(f"finetune.attention_rows: must be 'defect' or 'defect+mask', got {attention_rows!r}")
    pairs = []
    for i, (img, m) in enumerate(defects):
        img = _as_rgb(img, f"finetune defect {i}")
        m = np.asarray(m).astype(bool)
        if m.shape != img.shape[:2] or not m.any():
            raise DataError(f"finetune defect {i}: mask {m.shape} is empty or does not match image {img.shape[:2]}")
        pairs.append((img, m))
    normals = [_as_rgb(im, f"finetune normal {i}") for i, im in enumerate(normals or [])]
    lr = lr if lr is not None else (1e-4 if mode == "unet" else 1e-3)

    # LoRA under mixed precision: the frozen base in the autocast dtype (half its memory, and no cast copies of
    # its weights kept for the backward pass); the adapters, tokens and modules that train stay fp32
    half_base = mode == "lora" and precision != "fp32" and not trimap_control
    comps = load_pipeline_components(base, device=device, dtype=PRECISIONS[precision] if half_base else torch.float32)
    if precision == "fp16" and comps.device.type != "cuda":
        raise ParamsError(f"finetune.precision: fp16 autocast needs a CUDA device, got {comps.device.type}; use bf16 (CPU and CUDA)")
    if gradient_checkpointing:
        if not getattr(comps.unet, "_supports_gradient_checkpointing", False):
            raise ParamsError(f"finetune.gradient_checkpointing: {type(comps.unet).__name__} does not support it")
        comps.unet.enable_gradient_checkpointing()
    if hasattr(comps.prompts, "product"):  # the text prompts name the product (c_p, c_f)
        comps.prompts.product = category
    if tdia:
        comps.set_tdia(True)
    res = comps.resolution
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    # trainable parameters
    comps.unet.requires_grad_(False)
    if mode == "unet":
        comps.unet.requires_grad_(True)
        params = [p for p in comps.unet.parameters()]
    else:
        from peft import LoraConfig

        comps.unet.add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        )
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # fp32 adapters on a half base: AdamW updates need fp32 weights
    param_groups = [{"params": params, "lr": lr}]
    if comps.profile == "tiny":
        comps.prompts.requires_grad_(False)
        comps.prompts.add_defect(defect_type, seed=seed)
        tok = comps.prompts.defect_parameters(defect_type)
        for p in tok:
            p.requires_grad_(True)
        if cond_dropout_product > 0:  # Algorithm 1 drops c_p to the null tokens: learn them too
            comps.prompts.add_null(seed=seed)
            tok = tok + [comps.prompts.tokens["null"]]
            comps.prompts.tokens["null"].requires_grad_(True)
        params = params + tok
    module = None
    if mask_module > 0:  # G of Eq. 6, from scratch: channels = layers read x the defect prompt's tokens
        layers = comps.mask_module_layers()
        n_tokens = len(comps.prompts.embed("defect", defect_type))
        module = MaskGenerationModule(len(layers) * n_tokens, comps.latent_channels, layers=layers).to(comps.device)
        module.train()
        param_groups = param_groups + [{"params": list(module.parameters()), "lr": mask_module_lr}]
        params = params + list(module.parameters())
    n_prior = int(round(prior_fraction * batch_size)) if normals else 0

    def make_batch():
        crops, masks, inside = [], [], []
        for i in range(batch_size):
            if i < n_prior:
                img, m = random_normal_crop(normals, res, rng), random_mask(res, rng)
                inside.append("good")
            else:
                img, m = random_defect_crop(*pairs[int(rng.integers(len(pairs)))], res, rng)
                inside.append("defect")
            img, m = _dihedral(img, m, rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = _to_tensor(crops, masks, comps.device)
        if dropout:
            return (x, m, *double_free_dropout(inside, cond_dropout_product, cond_dropout_defect, drop_rng))
        return x, m, inside

    # Algorithm 1 draws from its own generator, so the batches themselves do not change with it
    dropout = cond_dropout_product > 0 or cond_dropout_defect > 0
    drop_rng = np.random.default_rng([seed, 1])
    comps.unet.train()
    # token embeddings learn faster than the UNet (textual inversion uses ~5e-3)
    step_kw = {"loss_norm": loss_norm, "attention_loss": attention_loss, "attention_rows": attention_rows}
    extra = {"cond_dropout_product": cond_dropout_product, "cond_dropout_defect": cond_dropout_defect} if dropout else {}
    if aal:
        step_kw.update(aal=True, aal_alpha=aal_alpha)
    if module is not None:
        step_kw.update(mask_module=module, mask_weight=mask_module)
    if tdia:
        extra["tdia"] = True
    if precision != "fp32":
        extra["precision"] = precision
    if gradient_checkpointing:
        extra["gradient_checkpointing"] = True
    if optimizer != "adamw":
        extra["optimizer"] = optimizer
    rows, seconds = _loop_groups(comps, params, param_groups, token_lr, steps, make_batch, defect_type, seed, progress, f"finetune {defect_type}", step_kw,
                                 precision=precision, optimizer=optimizer)
    comps.unet.eval()
    if gradient_checkpointing:
        comps.unet.disable_gradient_checkpointing()
    if trimap_control:  # AdaBLDM's spatial guidance, trained on the frozen fine-tuned model
        with fixed_threads():
            extra.update(train_trimap_controlnet(comps, make_batch, trimap_control_steps or steps, lr, defect_type, seed, loss_norm, progress))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "unet":
        comps.unet.save_pretrained(out / "unet", safe_serialization=True)
    else:
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusionPipeline.save_lora_weights(
            out / "lora", unet_lora_layers=get_peft_model_state_dict(comps.unet), safe_serialization=True
        )
    if comps.profile == "tiny":
        comps.prompts.save(out / "prompt_encoder")
    if module is not None:
        module.eval().save_pretrained(out / MASK_MODULE_DIR)
    if trimap_control:
        from defectforge.diffusion.control import CONTROLNET_DIR

        comps.controlnet.eval().save_pretrained(out / CONTROLNET_DIR, safe_serialization=True)
    base_ref = base_reference(base, out)
    logged = {k: v for k, v in step_kw.items() if k != "mask_module"}
    metrics = _metrics(
        rows, seconds, steps, batch_size, sum(p.numel() for p in params),
        {"mode": mode, "defect_type": defect_type, "n_defects": len(pairs), "n_normals": len(normals), "profile": comps.profile, **logged, **extra},
    )
    meta = {"format": "defectforge-finetune/1", "base": base_ref, "mode": mode, "defect_type": defect_type, "profile": comps.profile,
            "metrics": file_metrics(metrics)}
    if category is not None:
        meta["category"] = category
    if tdia:
        meta["tdia"] = True
    if module is not None:
        meta["mask_module"] = True
    if trimap_control:
        meta["trimap_control"] = True
    (out / FINETUNE_FILE).write_text(json.dumps(meta, indent=2))
    _write_curve(out / CURVE_FILE, rows, ["step", *_curve_keys(step_kw)])
    if progress:
        _log_timing(f"finetune {defect_type}", metrics)
    return metrics


def batch_trimaps(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Trimaps (B, 1, H, W) in {0, 1, 2} of a training batch (x in [-1, 1], m in {0, 1}): the
    foreground estimate of each crop with its mask as the defect region (masks/trimap.py)."""
    from defectforge.masks.trimap import make_trimap

    imgs = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    masks = m.detach().cpu().numpy()[:, 0] > 0.5
    tri = np.stack([make_trimap(i, k) for i, k in zip(imgs, masks)])
    return torch.from_numpy(tri)[:, None].to(x.device, torch.float32)


def train_trimap_controlnet(comps, make_batch, steps: int, lr: float, defect: str, seed: int, loss_norm: str = "all",
                            progress: bool = False) -> dict:
    """Build ``comps.controlnet`` from the UNet and train it alone (UNet and tokens frozen, as the
    reference trains its ControlNet on a locked SD) on Eq. 5 with the batch's trimaps; AdamW at ``lr``.
    Returns the loss of the first and last 10 steps (metrics)."""
    from defectforge.diffusion.control import build_trimap_controlnet

    comps.unet.requires_grad_(False)
    if hasattr(comps.prompts, "requires_grad_"):
        comps.prompts.requires_grad_(False)
    comps.controlnet = build_trimap_controlnet(comps.unet, comps.vae_scale_factor).to(comps.device)
    comps.controlnet.train()
    params = list(comps.controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        x, m, inside, *outside = make_batch()
        out = disentangled_step(comps, x, m, inside, defect, gen, outside=outside[0] if outside else None, loss_norm=loss_norm,
                                trimap=batch_trimaps(x, m))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out["loss"].item())
    comps.controlnet.eval()
    k = min(10, len(losses))
    return {"trimap_control_steps": steps, "trimap_control_loss_first": round(float(np.mean(losses[:k])), 6),
            "trimap_control_loss_last": round(float(np.mean(losses[-k:])), 6)}


def _loop_groups(comps, params, param_groups, token_lr, steps, make_batch, defect, seed, progress, desc, step_kw=None, threads: int = TRAIN_THREADS,
                 precision: str = "fp32", optimizer: str = "adamw"):
    """AdamW with warm-up and cosine decay; the defect tokens get their own learning rate.

    ``step_kw``: keyword arguments of :func:`disentangled_step` (loss norm, attention loss).
    Runs with ``threads`` torch threads (:func:`fixed_threads`); ``precision``: see :func:`finetune`."""
    with fixed_threads(threads):
        return _loop(comps, params, param_groups, token_lr, steps, make_batch, defect, seed, progress, desc, step_kw, precision, optimizer)


# finetune.precision: the autocast dtype of the forward pass (None: plain fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, precision: str):
    """The forward pass's context: ``torch.autocast`` at ``precision`` on ``device``'s type, or
    a no-op for "fp32" (so the fp32 path is the code it was)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _curve_keys(step_kw: dict) -> tuple[str, ...]:
    return (("loss", "matching", "regulariser") + (("attention",) if step_kw.get("attention_loss", 0) > 0 else ())
            + (("aal",) if step_kw.get("aal") else ()) + (("mask",) if step_kw.get("mask_weight", 0) > 0 else ()))


def _adamw(groups, optimizer: str):
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=1e-4)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ParamsError("finetune.optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes)") from e
    return bnb.optim.AdamW8bit(groups, weight_decay=1e-4)


def _loop(comps, params, param_groups, token_lr, steps, make_batch, defect, seed, progress, desc, step_kw, precision="fp32", optimizer="adamw"):
    step_kw = step_kw or {}
    keys = _curve_keys(step_kw)
    from tqdm import tqdm

    trainable_ids = {id(p) for g in param_groups for p in g["params"]}
    tokens = [p for p in params if id(p) not in trainable_ids]
    groups = [dict(g) for g in param_groups] + ([{"params": tokens, "lr": token_lr}] if tokens else [])
    base_lrs = [g["lr"] for g in groups]
    opt = _adamw(groups, optimizer)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    gen = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.perf_counter()
    acc, n_acc = dict.fromkeys(keys, 0.0), 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=5)
    for step in bar:
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = _lr_at(step, steps, lr0, warmup=min(50, steps // 10 + 1))
        x, m, inside, *outside = make_batch()  # a 4th entry: the product conditions of Algorithm 1
        with autocast_for(comps.device, precision):
            out = disentangled_step(comps, x, m, inside, defect, gen, outside=outside[0] if outside else None, **step_kw)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:  # fp16: scale the loss so small gradients do not flush to zero; skip steps with inf/nan gradients
            scaler.scale(out["loss"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        for k in acc:
            acc[k] += out[k].item()
        n_acc += 1
        if (step + 1) % 10 == 0 or step + 1 == steps:
            rows.append((step + 1, *(round(acc[k] / n_acc, 6) for k in keys)))
            bar.set_postfix(loss=f"{acc['loss'] / n_acc:.4f}")
            acc, n_acc = dict.fromkeys(acc, 0.0), 0
    return rows, time.perf_counter() - t0
