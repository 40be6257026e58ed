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
A method's own parts of training (DefectDiffu's condition dropout, AAL, mask module and
TDIA) plug in as :class:`TrainingHook` objects (``hooks``), which live in the method's package
(:mod:`defectforge.methods.defectdiffu.training`); the step and the loop run them in order
and know nothing of any one method.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionShareCollector, AttentionStoreProtocol, StoreGroup
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
def as_rgb(img: np.ndarray, where: str) -> np.ndarray:
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


def dihedral(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rotate: bool) -> tuple[np.ndarray, np.ndarray]:
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


def to_tensor(imgs: list[np.ndarray], masks: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    return x.to(device), m.to(device)


# ------------------------------------------------------------------ a method's part of training
@dataclass
class StepState:
    """What one training step hands its hooks: the batch, the model's outputs and the rows.

    ``x``, ``mask``: the pixel batch (B, 3, H, W) and masks (B, 1, H, W); ``z0``, ``m``: their
    latents; ``eps`` the noise, ``eps_def`` the C_1 rows' prediction (B, C, h, w);
    ``defect_rows``: the C_1 rows whose inside tokens are C_def; ``collector``: the attention
    share collector of the step (rows ``defect_rows`` first), or None.
    """

    comps: DiffusionComponents
    x: torch.Tensor
    mask: torch.Tensor
    z0: torch.Tensor
    m: torch.Tensor
    eps: torch.Tensor
    eps_def: torch.Tensor
    defect_rows: list[int]
    collector: AttentionShareCollector | None = None


class TrainingHook(Protocol):
    """A method's part of :func:`finetune` and :func:`disentangled_step`, plugged in instead of
    a branch inside them (a method package implements it; :class:`BaseTrainingHook` has every
    part switched off). Hooks run in the order given.

    ``needs_share``: the step collects the defect rows' attention share (:class:`StepState`
    ``collector``) even without the attention loss.
    """

    needs_share: bool

    def check(self, *, attention_loss: float, hooks: Sequence["TrainingHook"]) -> None:
        """Refuse options this hook cannot be combined with (:class:`ParamsError`)."""

    def configure(self, comps: DiffusionComponents, seed: int) -> None:
        """Before anything trains: set the model up (e.g. route its attention); ``seed``: the run's."""

    def tokens(self, comps: DiffusionComponents, seed: int) -> list[torch.Tensor]:
        """Extra prompt tokens to learn at the token learning rate (tiny profile)."""

    def param_groups(self, comps: DiffusionComponents, defect_type: str) -> list[dict]:
        """Extra optimiser groups (``{"params": [...], "lr": ...}``)."""

    def conditions(self, inside: list[str], outside: list[str] | None) -> tuple[list[str], list[str] | None]:
        """Each C_1 row's (inside, outside) condition of a batch (default: unchanged)."""

    def store(self, state: StepState) -> AttentionStoreProtocol | None:
        """A store the step's UNet call should fill for :meth:`extra_loss`, or None."""

    def extra_loss(self, state: StepState, out: dict[str, torch.Tensor]) -> None:
        """Add this hook's named loss terms to ``out`` and to ``out["loss"]``."""

    def curve_keys(self) -> tuple[str, ...]:
        """The entries of ``out`` this hook adds (columns of the training curve)."""

    def step_log(self) -> dict:
        """Options of the step, for the metrics."""

    def run_log(self) -> dict:
        """Options of the run, for the metrics."""

    def meta(self) -> dict:
        """Entries of the finetune folder's ``defectforge_finetune.json`` (how to load it)."""

    def save(self, out: Path) -> None:
        """Write what this hook trained into the finetune folder ``out``."""


class BaseTrainingHook:
    """:class:`TrainingHook` with every part switched off."""

    needs_share = False

    def check(self, *, attention_loss: float, hooks) -> None:
        pass

    def configure(self, comps, seed: int) -> None:
        pass

    def tokens(self, comps, seed: int) -> list[torch.Tensor]:
        return []

    def param_groups(self, comps, defect_type: str) -> list[dict]:
        return []

    def conditions(self, inside, outside):
        return inside, outside

    def store(self, state: StepState) -> AttentionStoreProtocol | None:
        return None

    def extra_loss(self, state: StepState, out: dict) -> None:
        pass

    def curve_keys(self) -> tuple[str, ...]:
        return ()

    def step_log(self) -> dict:
        return {}

    def run_log(self) -> dict:
        return {}

    def meta(self) -> dict:
        return {}

    def save(self, out: Path) -> None:
        pass


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
    hooks: Sequence[TrainingHook] = (),
    trimap: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. (5)-(7) on a batch: x (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1};
    ``inside[i]`` is "defect" or "good" (the inside tokens of C_1 for row i), ``outside[i]``
    "bg" (default) or "null" (its outside tokens: DefectDiffu's c_p or the null condition).

    ``attention_loss`` > 0 adds that weight times the attention loss on the rows of
    C_1 whose inside tokens are C_def ("defect"), and also on every C_2 row
    ("defect+mask"); the result then has an "attention" entry.

    ``hooks``: a method's loss terms (:class:`TrainingHook`, e.g. DefectDiffu's AAL and mask
    module loss): each may ask for a store in the UNet call and adds its named terms after
    Eq. 5 and the attention loss, in order. Under TDIA (``comps.tdia``) the contexts carry the
    fusion prompt and each part sees its own prompt.

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
    if attention_loss > 0 or any(h.needs_share for h in hooks):
        rows = list(defect_rows)  # first: a hook reads the defect rows' shares from the front
        if attention_loss > 0 and attention_rows == "defect+mask":
            rows += list(range(b, 2 * b))
        collector = AttentionShareCollector(rows) if rows else None
    state = StepState(comps, x, mask, z0, m, eps, eps[:0], defect_rows, collector)
    hook_stores = [h.store(state) for h in hooks]
    hook_stores = [st for st in hook_stores if st is not None]
    store = StoreGroup(collector, *hook_stores) if hook_stores else collector
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
    state.eps_def = eps_def
    for h in hooks:  # a method's terms, e.g. DefectDiffu's Eq. (11)
        h.extra_loss(state, out)
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
    images = [as_rgb(im, f"pretrain image {i}") for i, im in enumerate(images)]
    comps = build_tiny_components(seed=seed, device=resolve_device(device))
    res = comps.resolution
    rng = np.random.default_rng(seed)

    def make_batch():
        crops, masks = [], []
        for _ in range(batch_size):
            img, m = dihedral(random_normal_crop(images, res, rng), random_mask(res, rng), rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = to_tensor(crops, masks, comps.device)
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
    hooks: Sequence[TrainingHook] = (),
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

    ``hooks``: a method's parts of the fine-tune (:class:`TrainingHook`), e.g. DefectDiffu's
    condition dropout, AAL, mask module and TDIA (``defectforge.methods.defectdiffu.training``).

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
    _check_finetune_args(defects, defect_type, mode=mode, prior_fraction=prior_fraction, loss_norm=loss_norm, attention_loss=attention_loss,
                         attention_rows=attention_rows, precision=precision, optimizer=optimizer)
    hooks = list(hooks)
    for h in hooks:
        h.check(attention_loss=attention_loss, hooks=hooks)
    _check_attention_rows(attention_rows)
    pairs = _defect_pairs(defects)
    normals = [as_rgb(im, f"finetune normal {i}") for i, im in enumerate(normals or [])]
    lr = lr if lr is not None else (1e-4 if mode == "unet" else 1e-3)

    comps = _load_for_finetune(base, device, mode=mode, precision=precision, trimap_control=trimap_control,
                               gradient_checkpointing=gradient_checkpointing, category=category)
    for h in hooks:
        h.configure(comps, seed)
    res = comps.resolution
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params, param_groups = _trainable(comps, mode, lr, lora_rank, defect_type, hooks, seed)
    n_prior = int(round(prior_fraction * batch_size)) if normals else 0
    make_batch = _batch_maker(comps, pairs, normals, n_prior, batch_size, res, rng, rotate, hooks)

    comps.unet.train()
    # token embeddings learn faster than the UNet (textual inversion uses ~5e-3)
    step_kw = {"loss_norm": loss_norm, "attention_loss": attention_loss, "attention_rows": attention_rows, "hooks": hooks}
    extra = _run_log(hooks, precision, gradient_checkpointing, optimizer)
    rows, seconds = _loop_groups(comps, params, param_groups, token_lr, steps, make_batch, defect_type, seed, progress, f"finetune {defect_type}", step_kw,
                                 precision=precision, optimizer=optimizer)
    comps.unet.eval()
    if gradient_checkpointing:
        comps.unet.disable_gradient_checkpointing()
    if trimap_control:  # AdaBLDM's spatial guidance, trained on the frozen fine-tuned model
        with fixed_threads():
            extra.update(train_trimap_controlnet(comps, make_batch, trimap_control_steps or steps, lr, defect_type, seed, loss_norm, progress))

    out = Path(out_dir)
    _save_weights(comps, out, mode, hooks, trimap_control)
    logged = {**{k: v for k, v in step_kw.items() if k != "hooks"}, **{k: v for h in hooks for k, v in h.step_log().items()}}
    metrics = _metrics(
        rows, seconds, steps, batch_size, sum(p.numel() for p in params),
        {"mode": mode, "defect_type": defect_type, "n_defects": len(pairs), "n_normals": len(normals), "profile": comps.profile, **logged, **extra},
    )
    _write_meta(out, base, mode, defect_type, comps.profile, metrics, category, hooks, trimap_control)
    _write_curve(out / CURVE_FILE, rows, ["step", *_curve_keys(step_kw)])
    if progress:
        _log_timing(f"finetune {defect_type}", metrics)
    return metrics


def _write_meta(out: Path, base, mode: str, defect_type: str, profile: str, metrics: dict, category: str | None, hooks: list,
                trimap_control: bool) -> None:
    """``defectforge_finetune.json``: what the folder holds and how to load it, with the run's metrics."""
    meta = {"format": "defectforge-finetune/1", "base": base_reference(base, out), "mode": mode, "defect_type": defect_type,
            "profile": profile, "metrics": file_metrics(metrics)}
    if category is not None:
        meta["category"] = category
    for h in hooks:
        meta.update(h.meta())
    if trimap_control:
        meta["trimap_control"] = True
    (out / FINETUNE_FILE).write_text(json.dumps(meta, indent=2))


def _check_finetune_args(defects, defect_type: str, *, mode: str, prior_fraction: float, loss_norm: str, attention_loss: float,
                         attention_rows: str, precision: str, optimizer: str) -> None:
    """The fine-tune's options, each refused in one line naming its param (the hooks' own checks
    and ``attention_rows`` follow, in that order)."""
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


def _check_attention_rows(attention_rows: str) -> None:
    if attention_rows not in ("defect", "defect+mask"):
        raise ParamsError(f"finetune.attention_rows: must be 'defect' or 'defect+mask', got {attention_rows!r}")


def _defect_pairs(defects) -> list[tuple[np.ndarray, np.ndarray]]:
    """The real defects as (RGB uint8 image, bool mask) pairs; an empty or mismatched mask is refused."""
    pairs = []
    for i, (img, m) in enumerate(defects):
        img = as_rgb(img, f"finetune defect {i}")
        m = np.asarray(m).astype(bool)
        if m.shape != img.shape[:2] or not m.any():
            raise DataError(f"finetune defect {i}: mask {m.shape} is empty or does not match image {img.shape[:2]}")
        pairs.append((img, m))
    return pairs


def _load_for_finetune(base, device, *, mode: str, precision: str, trimap_control: bool, gradient_checkpointing: bool,
                       category: str | None) -> DiffusionComponents:
    """The base model, ready to train: its dtype, gradient checkpointing and the product its prompts name."""
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
    return comps


def _trainable(comps: DiffusionComponents, mode: str, lr: float, lora_rank: int, defect_type: str, hooks: list, seed: int) -> tuple[list, list[dict]]:
    """(every trained parameter, the optimizer's parameter groups): the UNet (mode "unet") or LoRA
    adapters on it, the defect type's token (tiny profile) and what the hooks add."""
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
        for h in hooks:
            tok = tok + h.tokens(comps, seed)
        params = params + tok
    for h in hooks:
        for g in h.param_groups(comps, defect_type):
            param_groups = param_groups + [g]
            params = params + list(g["params"])
    return params, param_groups


def _batch_maker(comps: DiffusionComponents, pairs, normals, n_prior: int, batch_size: int, res: int, rng: np.random.Generator,
                 rotate: bool, hooks: list):
    """The training batch source: ``n_prior`` crops of normals with random masks, the rest crops
    around real defects, each under a random dihedral transform; the hooks set the conditions."""

    def make_batch():
        crops, masks, inside = [], [], []
        for i in range(batch_size):
            if i < n_prior:
                img, m = random_normal_crop(normals, res, rng), random_mask(res, rng)
                inside.append("good")
            else:
                img, m = random_defect_crop(*pairs[int(rng.integers(len(pairs)))], res, rng)
                inside.append("defect")
            img, m = dihedral(img, m, rng, rotate)
            crops.append(img)
            masks.append(m)
        x, m = to_tensor(crops, masks, comps.device)
        outside = None
        for h in hooks:  # e.g. DefectDiffu's Algorithm 1, from the hook's own generator
            inside, outside = h.conditions(inside, outside)
        return (x, m, inside) if outside is None else (x, m, inside, outside)

    return make_batch


def _run_log(hooks: list, precision: str, gradient_checkpointing: bool, optimizer: str) -> dict:
    """The run's own entries of the metrics: the hooks' and the memory options that are not the default."""
    extra = {k: v for h in hooks for k, v in h.run_log().items()}
    if precision != "fp32":
        extra["precision"] = precision
    if gradient_checkpointing:
        extra["gradient_checkpointing"] = True
    if optimizer != "adamw":
        extra["optimizer"] = optimizer
    return extra


def _save_weights(comps: DiffusionComponents, out: Path, mode: str, hooks: list, trimap_control: bool) -> None:
    """The trained weights into ``out`` (safetensors): ``unet/`` or ``lora/``, the tiny profile's
    ``prompt_encoder/``, what the hooks save and the trimap ControlNet."""
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
    for h in hooks:
        h.save(out)
    if trimap_control:
        from defectforge.diffusion.control import CONTROLNET_DIR

        comps.controlnet.eval().save_pretrained(out / CONTROLNET_DIR, safe_serialization=True)


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
            + tuple(k for h in step_kw.get("hooks", ()) for k in h.curve_keys()))


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
