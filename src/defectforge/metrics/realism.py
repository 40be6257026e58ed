"""Realism scores of synthetic defects that need no downloaded weights.

FID / KID / LPIPS (:mod:`defectforge.metrics.fidelity`) compare feature statistics of a
backbone; without its published weights they say little about what a person sees. The
scores here measure the defect itself, inside its mask, against the real defects of the
same type:

* **saturation** — the share of in-mask pixels at the ends of the value range: a pixel
  is saturated when any channel is ``<= SATURATION_LOW`` or ``>= SATURATION_HIGH``.
  Real Magnetic Tile blowholes have none; a diffusion sampler whose predicted clean
  image is never bounded paints pitch-black or pure-colour plateaus.
* **intensity profile** (:func:`defect_stats`, :func:`intensity_distance`) — per-sample
  statistics of the grey image (mean of the three channels) inside the mask and in a
  ring just outside it, and the distance between the synthetic and the real
  per-sample distributions.
* **classifier two-sample test** (:func:`c2st_accuracy`, Lopez-Paz & Oquab 2017) — a
  small classifier, cross-validated, trained to tell real defect crops from synthetic
  ones; its held-out accuracy is the score (0.5: indistinguishable, 1.0: every crop is
  told apart).

Notation of :func:`defect_stats` (grey levels 0..255, ``g`` the grey image, ``M`` the
mask, ``R`` the ring ``dilate(M, ring) \\ M``, ``B`` the boundary band: the pixels
within 1 px of the mask edge, on both sides)::

    in_mask_mean, in_mask_std = mean(g[M]), std(g[M])
    ring_mean                 = mean(g[R])
    contrast                  = in_mask_mean - ring_mean          (< 0: a dark defect)
    edge_sharpness            = mean |∇g| on B / max(mean |∇g| on R \\ B, 1)
    chroma, chroma_ring       = mean (max - min over RGB) on M, on R
    chroma_source             = the same on M ∪ R of the defect-free source image
    speckle                   = mean over erode(M, 1 px) of max_c |I_c - median3x3(I_c)|

``speckle`` is the pixel-scale noise inside the defect: what a 3 x 3 median filter
removes, in the channel where it is largest (so colour confetti counts as well as grey
salt-and-pepper), away from the mask's own edge. A smooth pit or stain scores a few grey
levels; an under-trained sampler's leftover noise ("confetti") scores several times its
real defects' (the built-in brick holes of the tiny model: 6-13 against 0.8-2.0).

``|∇g|`` is the Sobel gradient magnitude in grey levels per pixel. ``edge_sharpness``
says how much stronger the edges on the mask boundary are than the surface's own
texture just outside: about 1 when the boundary does not show as an edge, and large for
a hard rim (a step of height C gives about C/2 on B). The denominator has a floor of one
grey level per pixel so that flat, noiseless surfaces do not divide by zero.

Example::

    >>> import numpy as np
    >>> img = np.full((32, 32, 3), 120, np.uint8)
    >>> mask = np.zeros((32, 32), bool); mask[12:20, 12:20] = True
    >>> img[mask] = 80
    >>> s = defect_stats(img, mask)
    >>> s["saturated_share"], s["contrast"], s["chroma"]
    (0.0, -40.0, 0.0)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from defectforge.errors import DataError

SATURATION_LOW = 3
SATURATION_HIGH = 252
DISTANCE_STATS = ("in_mask_mean", "in_mask_std", "contrast", "edge_sharpness")
_FLOOR_GRADIENT = 1.0  # grey levels per pixel: denominator floor of edge_sharpness
_CROSS = ndimage.generate_binary_structure(2, 1)


# --------------------------------------------------------------------------- per sample


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"{name}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{name}: expected an (H, W, 3) image, got shape {image.shape}")
    return image


def saturated_pixels(image: np.ndarray) -> np.ndarray:
    """bool (H, W): any channel at or beyond the ends of the value range."""
    image = _as_rgb(image, "image")
    return ((image <= SATURATION_LOW) | (image >= SATURATION_HIGH)).any(axis=2)


def _chroma(image: np.ndarray) -> np.ndarray:
    """Colour strength per pixel: max - min over the channels (0 on a grey pixel)."""
    return image.max(axis=2).astype(np.float64) - image.min(axis=2).astype(np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def defect_stats(image: np.ndarray, mask: np.ndarray, *, ring: int = 4, reference: np.ndarray | None = None) -> dict:
    """In-mask statistics of one defect (see the module docstring for the definitions).

    Args:
        image: uint8 (H, W, 3) (or (H, W) grey) image holding the defect.
        mask: bool (H, W) defect mask; must not be empty.
        ring: width in px of the ring just outside the mask (``ring_mean``, ``chroma_ring``).
        reference: the defect-free source image (synthetic samples), adds ``chroma_source``.

    Returns:
        dict of floats: ``saturated_share, in_mask_mean, in_mask_std, ring_mean, contrast,
        edge_sharpness, chroma, chroma_ring, speckle`` (+ ``chroma_source``), and ``mask_px`` /
        ``saturated_px`` (pixel counts, for pooled shares over a set). The ring values are
        NaN when the mask leaves no ring (it covers the image).

    Raises:
        DataError: wrong dtype or shape, or an empty mask.
    """
    image = _as_rgb(image, "image")
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise DataError(f"mask shape {mask.shape} != image shape {image.shape[:2]}")
    mask = mask.astype(bool)
    if not mask.any():
        raise DataError("empty mask: no in-mask pixels to measure")
    if ring < 1:
        raise DataError(f"ring={ring}: must be >= 1 px")

    # 1. saturation: any channel at the ends of the value range
    sat = saturated_pixels(image)[mask]
    # 2. grey intensity inside and in the ring
    g = image.astype(np.float64).mean(axis=2)
    ring_m = ndimage.binary_dilation(mask, _CROSS, iterations=ring) & ~mask
    inside = g[mask]
    in_mean, ring_mean = float(inside.mean()), _mean(g[ring_m])
    # 3. edge sharpness: Sobel |grad g| (grey levels / px) on the boundary band over the ring's
    grad = np.hypot(ndimage.sobel(g, axis=0), ndimage.sobel(g, axis=1)) / 8.0
    band = (mask & ~ndimage.binary_erosion(mask, _CROSS, border_value=1)) | (
        ndimage.binary_dilation(mask, _CROSS) & ~mask
    )
    texture = ring_m & ~band
    if not texture.any():
        texture = ring_m
    tex_grad = _mean(grad[texture])
    edge = _mean(grad[band]) / max(tex_grad, _FLOOR_GRADIENT) if texture.any() else math.nan
    # 4. colour strength
    chroma = _chroma(image)
    # 5. speckle: what a 3x3 median removes, largest channel, inside the mask away from its edge
    rgb = image.astype(np.float32)
    residual = np.max(np.abs(rgb - ndimage.median_filter(rgb, size=(3, 3, 1))), axis=2)
    core = ndimage.binary_erosion(mask, _CROSS)
    speckle = float(residual[core if core.any() else mask].mean())
    out = {
        "saturated_share": float(sat.mean()),
        "in_mask_mean": in_mean,
        "in_mask_std": float(inside.std()),
        "ring_mean": ring_mean,
        "contrast": in_mean - ring_mean,
        "edge_sharpness": edge,
        "chroma": float(chroma[mask].mean()),
        "chroma_ring": _mean(chroma[ring_m]),
        "speckle": speckle,
        "mask_px": float(mask.sum()),
        "saturated_px": float(sat.sum()),
    }
    if reference is not None:
        ref = _as_rgb(reference, "reference")
        if ref.shape != image.shape:
            raise DataError(f"reference shape {ref.shape} != image shape {image.shape}")
        out["chroma_source"] = float(_chroma(ref)[mask | ring_m].mean())
    return out


# --------------------------------------------------------------------------- per set


def pooled_saturation(stats: Sequence[dict]) -> float | None:
    """Share of saturated pixels over all in-mask pixels of a set (None for an empty set)."""
    n = sum(s["mask_px"] for s in stats)
    return float(sum(s["saturated_px"] for s in stats) / n) if n else None


def _scale(real: np.ndarray) -> float:
    q25, q75 = np.percentile(real, [25, 75])
    if q75 - q25 > 0:
        return float(q75 - q25)
    sd = float(real.std())
    return sd if sd > 0 else 1.0


def intensity_distance(syn: list[dict], real: list[dict], *, stats: Sequence[str] = DISTANCE_STATS) -> dict:
    """Distance between synthetic and real per-sample :func:`defect_stats`.

    Per statistic, the 1-D Wasserstein distance between the synthetic and the real
    values (``scipy.stats.wasserstein_distance``) divided by the real values' spread (the
    interquartile range; the standard deviation when the IQR is 0; 1 when both are 0);
    ``distance`` is the mean over the statistics. 0 for identical sets; a shift of the
    synthetic values by one real IQR adds 1 to that statistic. NaN values (no ring) are
    left out; a statistic with no values on either side is ``None`` and left out of the mean.

    Returns:
        ``{"distance": float, "per_stat": {stat: float | None}, "scale": {stat: float | None}}``
    """
    from scipy.stats import wasserstein_distance

    if not syn or not real:
        raise DataError(f"intensity_distance needs synthetic and real samples, got {len(syn)} and {len(real)}")
    per_stat, scale = {}, {}
    for key in stats:
        a = np.array([s[key] for s in syn], np.float64)
        b = np.array([s[key] for s in real], np.float64)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if not a.size or not b.size:
            per_stat[key] = scale[key] = None
            continue
        scale[key] = _scale(b)
        per_stat[key] = float(wasserstein_distance(a, b) / scale[key])
    used = [v for v in per_stat.values() if v is not None]
    if not used:
        raise DataError(f"intensity_distance: none of {list(stats)} has finite values on both sides")
    return {"distance": float(np.mean(used)), "per_stat": per_stat, "scale": scale}


# --------------------------------------------------------------------------- two-sample test

C2ST_RIDGE = 1.0
_RADII = (0.0, 0.25, 0.5, 0.75, math.inf)


def crop_features(crops: Sequence[np.ndarray], size: int = 32) -> np.ndarray:
    """(N, 26) float features of crops resized to ``size`` x ``size`` (grey in [0, 1]).

    grey mean, std and 1/5/25/50/75/95/99th percentiles; saturated share; chroma mean and
    95th percentile; Sobel gradient magnitude mean, std and 50/90/99th percentiles; mean
    |Laplacian| (fine texture); and the mean grey and mean gradient in four rings around
    the crop centre (the crops are centred on the defect, so these see its profile).
    """
    from defectforge.metrics.fidelity import images_to_tensor

    x = images_to_tensor(crops, "crops", size).numpy()  # uint8 (N, 3, s, s)
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c) / (size / 2)
    rings = [(r >= lo) & (r < hi) for lo, hi in zip(_RADII[:-1], _RADII[1:])]
    feats = []
    for im in x:
        rgb = np.transpose(im, (1, 2, 0))
        g = rgb.astype(np.float64).mean(axis=2) / 255.0
        grad = np.hypot(ndimage.sobel(g, axis=0), ndimage.sobel(g, axis=1)) / 8.0
        chroma = _chroma(rgb) / 255.0
        f = [g.mean(), g.std(), *np.percentile(g, [1, 5, 25, 50, 75, 95, 99])]
        f += [saturated_pixels(rgb).mean(), chroma.mean(), np.percentile(chroma, 95)]
        f += [grad.mean(), grad.std(), *np.percentile(grad, [50, 90, 99])]
        f += [np.abs(ndimage.laplace(g)).mean()]
        f += [g[m].mean() for m in rings] + [grad[m].mean() for m in rings]
        feats.append(f)
    return np.asarray(feats, np.float64).reshape(len(x), -1)


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float, iters: int = 50) -> np.ndarray:
    """Ridge-penalised logistic regression by Newton's method (IRLS); bias unpenalised."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    pen = np.full(xb.shape[1], ridge)
    pen[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + pen * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(pen) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _stratified_folds(y: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    fold = np.empty(len(y), np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = np.arange(len(idx)) % folds
    return fold


def _canonical_order(crops: Sequence[np.ndarray]) -> list[int]:
    """Indices of ``crops`` sorted by the SHA-256 of their bytes: the test sees a set, not a list."""
    import hashlib

    keys = [hashlib.sha256(np.ascontiguousarray(c).tobytes() + str(c.shape).encode()).hexdigest() for c in crops]
    return sorted(range(len(crops)), key=lambda i: (keys[i], i))


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        return (0.0, 1.0)
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def c2st_accuracy(
    real_crops: list[np.ndarray], syn_crops: list[np.ndarray], *, seed: int = 0, folds: int = 5, size: int = 32, repeats: int = 10
) -> dict:
    """Classifier two-sample test: held-out accuracy of telling real from synthetic crops.

    The classifier is a ridge-penalised logistic regression (``C2ST_RIDGE``, features
    standardised on the training folds) on :func:`crop_features`: deterministic, no
    weights to download, and robust with a few dozen crops per side, where a CNN trained
    for a few epochs can fail to learn and so read as "indistinguishable". The larger
    side is subsampled (seeded) to the smaller, so chance is 0.5; stratified k-fold
    (seeded), ``folds`` capped at the per-class count.

    Repeated cross-validation: one k-fold split of a few dozen crops moves the accuracy by
    up to 0.09 (the same Magnetic Tile images, listed in another order, gave 0.594 and
    0.688), so the subsample and the folds are drawn ``repeats`` times (seeds
    ``[seed, r]``) and the accuracy is their mean. The crops are put in a canonical order
    (by content hash) first, so the result depends on the two sets, not on their order.
    ``ci95`` is the Wilson interval of the accuracy on the 2n held-out predictions of one
    repeat: the sampling uncertainty that repeating does not remove (about +-0.17 at n = 16).

    Returns:
        ``{"accuracy": mean held-out accuracy over the repeats, "ci95", "repeats": per-repeat
        accuracies, "folds": per-fold accuracies of the first repeat, "n_real", "n_syn"
        (after balancing), "classifier": description}``

    Raises:
        DataError: fewer than 2 crops on either side.
    """
    n = min(len(real_crops), len(syn_crops))
    if n < 2:
        raise DataError(f"c2st needs >= 2 real and 2 synthetic crops, got {len(real_crops)} and {len(syn_crops)}")
    if folds < 2:
        raise DataError(f"c2st folds={folds}: must be >= 2")
    if repeats < 1:
        raise DataError(f"c2st repeats={repeats}: must be >= 1")
    real_crops = [real_crops[i] for i in _canonical_order(real_crops)]
    syn_crops = [syn_crops[i] for i in _canonical_order(syn_crops)]
    feats = crop_features(list(real_crops) + list(syn_crops), size)
    real_x, syn_x = feats[: len(real_crops)], feats[len(real_crops):]
    k = min(folds, n)
    per_repeat, first_folds = [], []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        ri = np.sort(rng.choice(len(real_crops), n, replace=False))
        si = np.sort(rng.choice(len(syn_crops), n, replace=False))
        x = np.vstack([real_x[ri], syn_x[si]])
        y = np.r_[np.zeros(n), np.ones(n)]
        fold = _stratified_folds(y, k, rng)
        correct = 0
        for f in range(k):
            tr, te = fold != f, fold == f
            mu, sd = x[tr].mean(0), x[tr].std(0)
            sd[sd < 1e-9] = 1.0
            w = _fit_logistic((x[tr] - mu) / sd, y[tr], C2ST_RIDGE)
            logits = np.hstack([(x[te] - mu) / sd, np.ones((te.sum(), 1))]) @ w
            hit = (logits > 0) == (y[te] == 1)
            correct += int(hit.sum())
            if r == 0:
                first_folds.append(float(hit.mean()))
        per_repeat.append(correct / (2 * n))
    acc = float(np.mean(per_repeat))
    return {
        "accuracy": acc,
        "ci95": wilson_interval(acc, 2 * n),
        "repeats": per_repeat,
        "folds": first_folds,
        "n_real": n,
        "n_syn": n,
        "classifier": f"logistic-regression(ridge={C2ST_RIDGE}) on {feats.shape[1]} crop features at {size}px, {k}-fold x {repeats}",
    }
