"""Train the U-Net detector and evaluate it on held-out real images.

The protocols of the seed papers: a U-Net is trained on defect image-mask pairs
together with normal images (whose masks are empty), and evaluated on the same
held-out real test split. ``mixed`` (DDIM-inversion paper, Sec. 4.3): once on the real
training split alone (``real-only``) and once per generation method on real + synthetic
pairs. ``synthetic`` (AnomalyDiffusion, "Anomaly generation for anomaly detection"): per
method on its synthetic pairs + the real normal images, no real defect image in
training (:mod:`defectforge.pipeline.detector` passes only the normals as
``train_items``). Every run of a comparison has the same seed, batch size, learning rate,
architecture and budget rule: the same number of steps (``budget="steps"``), or the same
number of passes over each run's own training union (``budget="epochs"``, the papers').

Resolution. Every image keeps its aspect ratio: it is resized by a fixed factor
``scale`` (e.g. 0.5: the same pixel pitch for every image of a dataset), or, with
``scale=None``, so that its short side is ``size``. Squashing a 250 x 600 px Magnetic
Tile image into a square erased thin cracks and small blowholes
(experiments/magnetic-tile-detector/magnetic-tile-detector-spread.md, "Making it learn").

Training on patches. Each step takes ``batch_size`` random ``patch`` x ``patch`` crops
at that resolution: half of them centred (with a random offset of up to a quarter
patch) on a random defect pixel of a defect image, the rest anywhere in a defect-free
image. A small defect keeps its pixels, and a step costs the same whatever the image
size. Evaluation is fully convolutional on the whole resized image (reflect-padded to a
multiple of ``2 ** (depth - 1)``, the map cropped back); metrics are computed at that
resolution, over the pixels of every image (images of different sizes are not resized
to a common grid: :func:`ragged_detection_metrics`).

Image score: the max of the anomaly map after average pooling (AnomalyDiffusion:
"localisation outcomes are aggregated using average pooling to derive confidence
scores", as in DRAEM), with a ``score_pool`` x ``score_pool`` window.

Loss: per-pixel binary cross-entropy + soft Dice (defect pixels are rare). With patches,
use ``norm="batch"`` (see :mod:`defectforge.detector.unet`).

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> items = []
    >>> for i in range(4):
    ...     im = rng.integers(90, 110, (32, 40, 3), dtype=np.uint8); m = np.zeros((32, 40), bool)
    ...     if i % 2: m[8:16, 8:16] = True; im[m] = 250
    ...     items.append((im, m))
    >>> model, curve = train_detector(items, epochs=2, batch_size=2, size=32, patch=16, base_channels=4, depth=2)
    >>> sorted(curve[0])[:3], len(curve)
    (['epoch', 'loss', 'lr'], 2)
    >>> [m.shape for m in predict_maps(model, [items[0][0]])]
    [(32, 40)]
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from defectforge.detector.unet import UNet
from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.detection import DETECTION_KEYS, binary_scores, detection_metrics

Item = tuple[np.ndarray, np.ndarray]


@dataclass
class Prepared:
    """Images and masks at the detector's resolution (aspect ratio kept, sizes may differ).

    ``xs[i]``: float (3, h, w) in [-1, 1]; ``ys[i]``: float (1, h, w) in {0, 1};
    ``defect_pixels[i]``: (k, 2) long tensor of the (row, col) of the mask's pixels.
    """

    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    size: int
    scale: float | None
    defect_pixels: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def target_shape(h: int, w: int, size: int, scale: float | None) -> tuple[int, int]:
    """(h, w) at the detector's resolution: ``scale`` x the original, or the short side = ``size``."""
    f = scale if scale is not None else size / min(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def prepare_items(items: Sequence[Item], size: int, name: str = "items", *, scale: float | None = None) -> Prepared:
    """Resize (image, mask) pairs to the detector's resolution, keeping the aspect ratio.

    Images bilinear with antialiasing, masks nearest (a thin crack keeps its pixels as long
    as it is at least one output pixel wide).
    """
    if scale is not None and not (0 < scale <= 4 and math.isfinite(scale)):
        raise DefectforgeError(f"detector.scale must be in (0, 4], got {scale!r}")
    xs, ys, pix = [], [], []
    for i, it in enumerate(items):
        try:
            image, mask = it
        except (TypeError, ValueError):
            raise DataError(f"{name}[{i}]: expected an (image, mask) pair") from None
        image, mask = np.asarray(image), np.asarray(mask)
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise DefectforgeError(f"{name}[{i}]: image contains NaN or infinite values")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"{name}[{i}]: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{name}[{i}]: mask shape {mask.shape} != image shape {image.shape[:2]}")
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
        y = torch.from_numpy(np.ascontiguousarray(mask.astype(np.float32)))[None, None]
        hw = target_shape(*image.shape[:2], size, scale)
        if x.shape[-2:] != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(y, size=hw, mode="nearest")
        xs.append((x / 127.5 - 1.0)[0])
        ys.append(y[0])
        pix.append(torch.nonzero(y[0, 0] > 0.5))
    if not xs:
        raise DataError(f"{name}: no (image, mask) pairs given")
    return Prepared(xs, ys, size, scale, pix)


def sample_patch(x: torch.Tensor, y: torch.Tensor, defect_pixels: torch.Tensor, patch: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``patch`` x ``patch`` crop of (x, y) from three uniforms ``u`` in [0, 1).

    With ``defect_pixels`` non-empty: the crop is centred on the defect pixel
    ``floor(u0 * k)`` shifted by up to ``patch // 4`` in each direction (``u1``, ``u2``),
    then clipped to the image, so it always contains that pixel. Otherwise the top-left
    corner is uniform (``u1``, ``u2``). Images smaller than the patch are padded
    (reflect, or replicate when too small to reflect; the mask with zeros).
    """
    h, w = x.shape[-2:]
    ph, pw = max(0, patch - h), max(0, patch - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]
        y = F.pad(y, (0, pw, 0, ph), value=0.0)
        h, w = x.shape[-2:]
    u0, u1, u2 = (float(v) for v in u[:3])
    if len(defect_pixels):
        r, c = defect_pixels[min(int(u0 * len(defect_pixels)), len(defect_pixels) - 1)].tolist()
        q = patch // 4
        top = r - patch // 2 + min(int(u1 * (2 * q + 1)), 2 * q) - q
        left = c - patch // 2 + min(int(u2 * (2 * q + 1)), 2 * q) - q
        top, left = min(max(top, 0), h - patch), min(max(left, 0), w - patch)
    else:
        top, left = min(int(u1 * (h - patch + 1)), h - patch), min(int(u2 * (w - patch + 1)), w - patch)
    return x[:, top : top + patch, left : left + patch], y[:, top : top + patch, left : left + patch]


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, y)
    p = torch.sigmoid(logits)
    dice = 1.0 - (2 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    return bce + dice


def _report(progress, row: dict) -> None:
    if progress is True:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"[detector] {shown}", file=sys.stderr, flush=True)
    elif callable(progress):
        progress(row)


class _Stream:
    """Endless shuffled passes over ``n`` indices (a fresh permutation per pass)."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen, self.order, self.pos = n, gen, torch.empty(0, dtype=torch.long), 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def _as_prepared(items, size: int, scale: float | None, name: str) -> Prepared:
    if isinstance(items, Prepared):
        if items.size != size or items.scale != scale:
            raise DataError(f"{name}: prepared at size {items.size}, scale {items.scale}; the detector uses size {size}, scale {scale}")
        return items
    return prepare_items(items, size, name, scale=scale)


def train_detector(
    train_items: Sequence[Item] | Prepared,
    *,
    synthetic_items: Sequence[Item] | Prepared | None = None,
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    size: int = 128,
    scale: float | None = None,
    patch: int | None = None,
    base_channels: int = 16,
    depth: int = 4,
    norm: str = "group",
    score_pool: int = 9,
    val_items: Sequence[Item] | None = None,
    progress: bool | Callable[[dict], None] = False,
    budget: str = "steps",
    real_set_size: int | None = None,
) -> tuple[UNet, list[dict]]:
    """Train a U-Net on real (image, mask) pairs, optionally with synthetic pairs.

    Budget and sampling (the same for real-only and every real+synthetic run, so a paired
    comparison measures the data and nothing else):

    1. ``budget="steps"``: ``steps = epochs * ceil(real_set_size / batch_size)``, counted in
       passes over the *real* training set (``real_set_size``, default ``len(train_items)``;
       the synthetic protocol passes the size of the whole real split, whose defect images it
       leaves out), so adding synthetic samples does not add steps.
       ``budget="epochs"`` (the papers': AnomalyDiffusion, DDIM-inversion Sec. 4.3):
       ``steps = epochs * ceil((len(train_items) + len(synthetic_items)) / batch_size)``,
       passes over the run's own training union, so more synthetic data trains more steps.
    2. Balanced batches of ``patch`` x ``patch`` crops (``patch=None``: ``size``; see
       :func:`sample_patch`): ``batch_size // 2`` slots hold a crop around a defect pixel of
       a defect image, the rest a random crop of a defect-free image. A defect slot takes a
       synthetic sample with probability ``n_syn / (n_syn + n_real_defects)`` (the share it
       would have in the union), otherwise the next real defect.
    3. Paired randomness: the weights come from ``seed``; the defect-free stream, the real
       defect stream, the synthetic stream, the real/synthetic choice, the crop positions
       and the flips each have their own generator derived from ``seed``, with the same
       number of draws per step whatever the pools hold. Two runs with the same seed start
       from the same weights and see the real images in the same order.
    4. Adam with cosine learning-rate decay from ``lr`` to 0 over ``steps``.

    ``train_items`` / ``synthetic_items`` may be :class:`Prepared` by :func:`prepare_items`
    (to prepare a dataset once for several seeds). Returns (model in eval mode, curve): one
    row per pass (over the real set, or the union with ``budget="epochs"``): ``epoch`` (1-based), ``step``, ``loss`` (mean over the
    pass), ``lr`` (at its end), ``seconds``, and with ``val_items`` the ``val_<metric>`` of
    :func:`evaluate_detector`. Same arguments and seed give the same weights (CPU).
    """
    patch = size if patch is None else patch
    _check_settings(epochs=epochs, batch_size=batch_size, size=size, patch=patch, depth=depth, lr=lr, budget=budget,
                    real_set_size=real_set_size)
    real = _as_prepared(train_items, size, scale, "train_items")
    syn = _as_prepared(synthetic_items, size, scale, "synthetic_items") if synthetic_items is not None and len(synthetic_items) else None
    plan = _plan(real, syn, epochs=epochs, batch_size=batch_size, budget=budget, real_set_size=real_set_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(base_channels=base_channels, depth=depth, norm=norm)
    model.config.update(size=size, scale=scale, patch=patch, score_pool=score_pool)
    batches = _Batches(real, syn, plan, batch_size=batch_size, patch=patch, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.steps, eta_min=0.0)
    curve: list[dict] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, plan.steps + 1):
        xb, yb = batches.next()
        losses.append(_train_step(model, opt, sched, xb, yb, step=step, lr=lr))
        if step % plan.steps_per_epoch == 0:
            curve.append(_pass_row(model, opt, losses, step=step, plan=plan, t0=t0, val_items=val_items))
            _report(progress, curve[-1])
            losses, t0 = [], time.perf_counter()
    model.eval()
    return model, curve


# The steps of train_detector: the settings checked, the budget and pools planned (1.),
# balanced batches drawn with paired randomness (2., 3.), one optimiser step (4.).


def _check_settings(*, epochs, batch_size, size, patch, depth, lr, budget, real_set_size) -> None:
    """Refuse a setting the detector cannot train with, naming its params key."""
    for key, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("size", size, 8), ("patch", patch, 8)):
        if not isinstance(v, int) or v < lo:
            raise DefectforgeError(f"detector.{key} must be an integer >= {lo}, got {v!r}")
    if budget not in ("steps", "epochs"):
        raise DefectforgeError(f"detector.budget must be 'steps' or 'epochs', got {budget!r}")
    if real_set_size is not None and (not isinstance(real_set_size, int) or real_set_size < 1):
        raise DefectforgeError(f"detector real_set_size must be an integer >= 1, got {real_set_size!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise DefectforgeError(f"detector.lr must be a positive number, got {lr!r}")
    if patch % 2 ** (depth - 1):
        raise DefectforgeError(f"detector.patch {patch} must be divisible by 2**(depth-1) = {2 ** (depth - 1)}")


@dataclass(frozen=True)
class _Plan:
    """The pools a batch draws from and the number of steps (see :func:`train_detector`, 1. and 2.)."""

    good: list[int]       # real defect-free images
    defect: list[int]     # real defect images
    syn_ok: list[int]     # synthetic samples with a defect pixel
    n_def_slots: int      # batch slots that hold a crop around a defect pixel
    p_syn: float          # probability that a defect slot takes a synthetic sample
    steps_per_epoch: int
    steps: int


def _plan(real: Prepared, syn: Prepared | None, *, epochs: int, batch_size: int, budget: str,
          real_set_size: int | None) -> _Plan:
    n_syn = len(syn) if syn is not None else 0
    is_defect = [len(p) > 0 for p in real.defect_pixels]
    good = [i for i, d in enumerate(is_defect) if not d]
    defect = [i for i, d in enumerate(is_defect) if d]
    syn_ok = [i for i in range(n_syn) if len(syn.defect_pixels[i])] if syn is not None else []
    epoch_size = len(real) + n_syn if budget == "epochs" else len(real) if real_set_size is None else real_set_size
    steps_per_epoch = math.ceil(epoch_size / batch_size)
    n_def_slots = 0 if not (defect or syn_ok) else batch_size if not good else max(1, batch_size // 2)
    p_syn = len(syn_ok) / (len(syn_ok) + len(defect)) if syn_ok else 0.0
    return _Plan(good, defect, syn_ok, n_def_slots, p_syn, steps_per_epoch, epochs * steps_per_epoch)


class _Batches:
    """Balanced batches of flipped crops; each random source has its own generator derived from
    ``seed`` and is drawn from the same number of times per batch, whatever the pools hold."""

    def __init__(self, real: Prepared, syn: Prepared | None, plan: _Plan, *, batch_size: int, patch: int, seed: int):
        self.real, self.syn, self.plan, self.batch_size, self.patch = real, syn, plan, batch_size, patch
        gens = [torch.Generator().manual_seed(seed * 7919 + k) for k in range(1, 7)]
        self.s_good, self.s_def, self.s_syn = (_Stream(len(plan.good), gens[0]), _Stream(len(plan.defect), gens[1]),
                                               _Stream(len(plan.syn_ok), gens[2]))
        self.g_mix, self.g_flip, self.g_crop = gens[3], gens[4], gens[5]

    def next(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        plan = self.plan
        use_syn = (torch.rand(plan.n_def_slots, generator=self.g_mix) < plan.p_syn).tolist()
        flips = torch.rand(self.batch_size, 2, generator=self.g_flip) < 0.5
        crops = torch.rand(self.batch_size, 3, generator=self.g_crop)
        xb, yb = [], []
        for k in range(self.batch_size):
            if k < plan.n_def_slots:
                if (use_syn[k] or not plan.defect) and plan.syn_ok:
                    src, i = self.syn, plan.syn_ok[self.s_syn.next()]
                else:
                    src, i = self.real, plan.defect[self.s_def.next()]
            else:
                src, i = self.real, plan.good[self.s_good.next()]
            xi, yi = sample_patch(src.xs[i], src.ys[i], src.defect_pixels[i], self.patch, crops[k])
            dims = [d for d, f in zip((-1, -2), flips[k].tolist()) if f]
            if dims:  # the same random flip for image and mask
                xi, yi = xi.flip(dims), yi.flip(dims)
            xb.append(xi)
            yb.append(yi)
        return xb, yb


def _pass_row(model: UNet, opt, losses: list[float], *, step: int, plan: _Plan, t0: float, val_items) -> dict:
    """The curve's row at the end of a pass: its mean loss, the learning rate, its seconds and,
    with ``val_items``, the validation metrics (the model is back in training mode after)."""
    row = {"epoch": step // plan.steps_per_epoch, "step": step, "loss": float(np.mean(losses)),
           "lr": float(opt.param_groups[0]["lr"]), "seconds": round(time.perf_counter() - t0, 3)}
    if val_items:
        m = evaluate_detector(model, val_items)
        row.update({f"val_{k}": m[k] for k in DETECTION_KEYS})
        model.train()
    return row


def _train_step(model: UNet, opt, sched, xb: list[torch.Tensor], yb: list[torch.Tensor], *, step: int, lr: float) -> float:
    """One Adam step on the batch and one step of the learning-rate schedule; the batch's loss."""
    loss = _loss(model(torch.stack(xb)), torch.stack(yb))
    if not torch.isfinite(loss.detach()):
        raise DefectforgeError(f"detector loss became {loss.item()} at step {step} (lr={lr}); lower detector.lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


@torch.no_grad()
def predict_maps(model: UNet, images: Sequence[np.ndarray] | Prepared, batch_size: int = 8) -> list[np.ndarray]:
    """Defect probability maps, one float32 (h, w) array per image, at the detector's resolution.

    Fully convolutional on the whole resized image: reflect-padded (bottom, right) to a
    multiple of ``2 ** (depth - 1)``, the map cropped back. Images of the same shape are
    run together in batches of ``batch_size``.
    """
    size, scale = model.config["size"], model.config.get("scale")
    if isinstance(images, Prepared):
        prep = _as_prepared(images, size, scale, "images")
    else:
        prep = prepare_items([(im, np.zeros(np.asarray(im).shape[:2], bool)) for im in images], size, "images", scale=scale)
    mult = 2 ** (model.config["depth"] - 1)
    model.eval()
    maps: list[np.ndarray | None] = [None] * len(prep)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(prep.xs):
        by_shape.setdefault(tuple(x.shape[-2:]), []).append(i)
    for (h, w), idx in by_shape.items():
        ph, pw = -h % mult, -w % mult
        for j in range(0, len(idx), batch_size):
            x = torch.stack([prep.xs[i] for i in idx[j : j + batch_size]])
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
            p = torch.sigmoid(model(x))[:, 0, :h, :w].numpy().astype(np.float32)
            for i, m in zip(idx[j : j + batch_size], p):
                maps[i] = m
    if not all(np.isfinite(m).all() for m in maps):
        raise DefectforgeError("detector output contains NaN or infinite values")
    return maps


def image_scores_from_maps(maps: Sequence[np.ndarray] | np.ndarray, pool: int) -> np.ndarray:
    """Max of each average-pooled map (window ``pool``, stride 1, same size)."""
    out = []
    for m in maps:
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
        if pool > 1:
            t = F.avg_pool2d(t, pool, stride=1, padding=pool // 2, count_include_pad=False)
        out.append(float(t.max()))
    return np.asarray(out, dtype=np.float64)


def ragged_detection_metrics(image_scores, image_labels, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, fpr_limit: float = 0.3) -> dict:
    """:func:`~defectforge.metrics.detection.detection_metrics` for maps of different sizes.

    Same-shaped maps go to ``detection_metrics`` as they are. Otherwise pixel AUROC / AP /
    F1-max come from the pixels of all images concatenated, and AUPRO from the 8-connected
    regions of each mask, labelled image by image, and the FPR over all defect-free pixels
    (the MVTec AD reference, with no padding pixels anywhere).
    """
    shapes = {np.shape(m) for m in maps}
    if len(shapes) <= 1:
        return detection_metrics(image_scores, image_labels, np.stack(maps) if len(maps) else np.zeros((0, 1, 1)), np.stack(masks) if len(masks) else np.zeros((0, 1, 1), bool), fpr_limit=fpr_limit)
    for i, (m, g) in enumerate(zip(maps, masks)):
        if np.shape(m) != np.shape(g):
            raise DataError(f"map {i} has shape {np.shape(m)} but its mask {np.shape(g)}")
    # image-level metrics and counts: the first map of every image stands in (pixels are not used)
    first = [np.asarray(m)[:1, :1] for m in maps]
    res = detection_metrics(image_scores, image_labels, np.stack(first), np.zeros((len(maps), 1, 1), bool), fpr_limit=fpr_limit)
    from scipy import ndimage

    s_pix = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    m_pix = np.concatenate([np.asarray(g, bool).ravel() for g in masks])
    res["n_regions"] = int(sum(ndimage.label(np.asarray(g, bool), structure=np.ones((3, 3), int))[1] for g in masks))
    n_pos = int(m_pix.sum())
    if 0 < n_pos < m_pix.size:
        r = binary_scores(s_pix, m_pix)
        res.update(pixel_auroc=r["auroc"], pixel_ap=r["ap"], pixel_f1max=r["f1max"], pixel_skipped=None, aupro_skipped=None)
        res["aupro"] = _ragged_aupro(maps, masks, fpr_limit)
    else:
        reason = f"needs both defect and defect-free pixels, got {n_pos} defect pixels of {m_pix.size}"
        res.update(pixel_auroc=None, pixel_ap=None, pixel_f1max=None, aupro=None, pixel_skipped=reason, aupro_skipped=reason)
    return res


def _ragged_aupro(maps, masks, fpr_limit: float) -> float:
    """AUPRO of :func:`~defectforge.metrics.detection.pro_curve` with regions labelled per image."""
    from scipy import ndimage

    from defectforge.metrics.detection import trapezoid_to

    fp, pro, scores = [], [], []
    num_ok, num_regions = 0, 0
    for m, g in zip(maps, masks):
        g = np.asarray(g, bool)
        labeled, n = ndimage.label(g, structure=np.ones((3, 3), int))  # 8-connectivity, per image
        num_regions += n
        ok = labeled == 0
        num_ok += int(ok.sum())
        f = ok.astype(np.float64)
        c = np.zeros(g.shape, np.float64)
        if n:
            sizes = np.bincount(labeled.ravel())
            c[~ok] = 1.0 / sizes[labeled[~ok]]
        fp.append(f.ravel())
        pro.append(c.ravel())
        scores.append(np.asarray(m, np.float64).ravel())
    s = np.concatenate(scores)
    order = np.argsort(s, kind="stable")[::-1]
    fprs = np.cumsum(np.concatenate(fp)[order]) / num_ok
    pros = np.cumsum(np.concatenate(pro)[order]) / num_regions
    keep = np.append(np.diff(s[order]) != 0, True)  # last index of every tie group
    fprs = np.clip(np.concatenate([[0.0], fprs[keep]]), 0, 1)
    pros = np.clip(np.concatenate([[0.0], pros[keep]]), 0, 1)
    return trapezoid_to(fprs, pros, fpr_limit) / fpr_limit


def evaluate_detector(model: UNet, test_items: Sequence[Item] | Prepared, *, batch_size: int = 8,
                      score_pool: int | None = None) -> dict:
    """Detection metrics of ``model`` on (image, mask) pairs; good images have empty masks.

    Returns :func:`~defectforge.metrics.detection.detection_metrics`'s dict plus
    ``eval_size``, ``eval_scale`` and ``score_pool``.
    """
    return evaluate_groups(model, test_items, {"all": None}, batch_size=batch_size, score_pool=score_pool)["all"]


def evaluate_groups(model: UNet, test_items: Sequence[Item] | Prepared, groups: dict[str, Sequence[int] | None],
                    *, batch_size: int = 8, score_pool: int | None = None) -> dict[str, dict]:
    """Metrics of one model on several subsets of the test set, from one prediction pass.

    ``groups`` maps a name to the indices of its test items (None: all of them), e.g.
    ``{"all": None, "crack": [crack images + all defect-free images]}``. Metrics are
    computed at the detector's resolution (aspect ratio kept: ``scale`` x the original,
    or the short side = ``size``), over the whole of every image.
    """
    size, scale = model.config["size"], model.config.get("scale")
    pool = model.config.get("score_pool", 9) if score_pool is None else score_pool
    prep = _as_prepared(test_items, size, scale, "test_items")
    maps = predict_maps(model, prep, batch_size)
    masks = [y[0].numpy() > 0.5 for y in prep.ys]
    labels = np.array([m.any() for m in masks])
    scores = image_scores_from_maps(maps, pool)
    out = {}
    for name, idx in groups.items():
        idx = np.arange(len(maps)) if idx is None else np.asarray(idx, dtype=np.int64)
        res = ragged_detection_metrics(scores[idx], labels[idx], [maps[i] for i in idx], [masks[i] for i in idx])
        res.update(eval_size=size, eval_scale=scale, score_pool=pool)
        out[name] = res
    return out


def save_detector(model: UNet, path: str | Path) -> Path:
    """Write the weights as safetensors, the config in the file's metadata (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"config": json.dumps(model.config), "format": "pt"})
    tmp.replace(path)
    return path


def load_detector(path: str | Path) -> UNet:
    """Load a detector written by :func:`save_detector`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DefectforgeError(f"{path}: detector weights not found")
    try:
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {})["config"])
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DefectforgeError(f"{path}: not a defectforge detector safetensors file ({exc.__class__.__name__})") from None
    model = UNet(config["in_channels"], config["base_channels"], config["depth"], config.get("norm", "group"))
    model.config.update({k: v for k, v in config.items() if k not in model.config})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise DefectforgeError(f"{path}: weights do not fit the U-Net config {config}") from None
    return model.eval()
