"""Detection and localisation metrics of a defect detector on held-out real images.

The protocol of the seed papers (ddim-inversion Tab. 2, AnomalyDiffusion Tab. 2):
image-level AUROC, AP and F1-max from one score per image, pixel-level AUROC, AP and
F1-max from the anomaly map, and AUPRO (ddim-inversion's "PRO score").

* AUROC, AP and the precision-recall curve (for F1-max = max_t 2PR/(P+R)) come from
  torchmetrics (exact, unbinned). Scores are min-max rescaled to [0, 1] first: a
  monotone map that changes none of these metrics, and stops torchmetrics from
  applying a sigmoid to scores outside [0, 1] (which would merge large scores into
  ties).
* AUPRO follows the MVTec AD reference (Bergmann et al.): ground-truth regions are the
  8-connected components of every mask; for a threshold t, FPR(t) is the fraction of
  all defect-free pixels with score >= t and PRO(t) is the mean over all regions of
  the fraction of the region's pixels with score >= t. The PRO-FPR curve is
  integrated with the trapezoidal rule up to FPR = 0.3 (interpolating the curve at
  0.3) and divided by 0.3, so a perfect map scores 1.
* AdaBLDM's IAP / IAP90 are left out: the seed text holds only AdaBLDM's abstract, so
  their definition (instance matching rule, IoU threshold) is not given there.

Example::

    >>> import numpy as np
    >>> masks = np.zeros((2, 8, 8), bool); masks[0, 2:4, 2:4] = True
    >>> m = detection_metrics([0.9, 0.1], [1, 0], masks.astype(float), masks)
    >>> m["image_auroc"], m["pixel_ap"], m["aupro"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from bisect import bisect

import numpy as np
import torch
from scipy import ndimage

from defectforge.errors import DataError, DefectforgeError

DETECTION_KEYS = (
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro",
)


def _as_float(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DefectforgeError(f"{name}: contains NaN or infinite scores")
    return a


def _rescale(s: np.ndarray) -> torch.Tensor:
    lo, hi = float(s.min()), float(s.max())
    s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return torch.from_numpy(np.ascontiguousarray(s, dtype=np.float64))


def binary_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max of ``scores`` for binary ``labels`` (both classes present)."""
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
        binary_precision_recall_curve,
    )

    p = _rescale(scores.ravel())
    t = torch.from_numpy(np.ascontiguousarray(labels.ravel().astype(np.int64)))
    prec, rec, _ = binary_precision_recall_curve(p, t, thresholds=None)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(prec))
    return {
        "auroc": float(binary_auroc(p, t, thresholds=None)),
        "ap": float(binary_average_precision(p, t, thresholds=None)),
        "f1max": float(f1.max()),
    }


def pro_curve(pixel_scores: np.ndarray, pixel_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, descending thresholds, starting at (0, 0).

    The MVTec AD reference: every pixel contributes +1/num_ok_pixels to the FPR when
    it is defect-free and +1/(region size * num_regions) to the PRO when it lies in a
    ground-truth region; sorting by score and accumulating gives both curves at once.
    """
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity
    fp_change = np.zeros(pixel_masks.shape, dtype=np.float64)
    pro_change = np.zeros(pixel_masks.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i, gt in enumerate(pixel_masks):
        labeled, n = ndimage.label(gt, structure=structure)
        num_regions += n
        ok = labeled == 0
        num_ok += int(ok.sum())
        fp_change[i][ok] = 1.0
        if n:
            sizes = np.bincount(labeled.ravel())
            region = labeled > 0
            pro_change[i][region] = 1.0 / sizes[labeled[region]]
    scores = pixel_scores.ravel()
    order = np.argsort(scores, kind="stable")[::-1]
    scores_sorted = scores[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / num_ok
    pros = np.cumsum(pro_change.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores_sorted) != 0, True)  # last index of every tie group
    fprs = np.clip(np.concatenate([[0.0], fprs[keep]]), 0, 1)
    pros = np.clip(np.concatenate([[0.0], pros[keep]]), 0, 1)
    return fprs, pros


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) from x[0] to x_max, linearly interpolating y at x_max (x ascending)."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(list(x), x_max)
        if not 0 < ins < len(x):
            raise DefectforgeError(f"cannot integrate the PRO curve to FPR {x_max}: curve ends at {x[-1]}")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    m = x <= x_max
    x, y = x[m], y[m]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(pixel_scores: np.ndarray, pixel_masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (in [0, 1])."""
    fprs, pros = pro_curve(pixel_scores, pixel_masks)
    return trapezoid_to(fprs, pros, fpr_limit) / fpr_limit


def detection_metrics(
    image_scores,
    image_labels,
    pixel_scores,
    pixel_masks,
    *,
    fpr_limit: float = 0.3,
) -> dict:
    """Image- and pixel-level AUROC / AP / F1-max and AUPRO.

    Args:
        image_scores: (N,) one anomaly score per image.
        image_labels: (N,) 1 = defective, 0 = good.
        pixel_scores: (N, H, W) anomaly maps.
        pixel_masks: (N, H, W) ground-truth masks (bool); good images have empty masks.

    Returns:
        dict with the seven ``DETECTION_KEYS`` (float in [0, 1], or None),
        ``image_skipped`` / ``pixel_skipped`` / ``aupro_skipped`` reasons (or None),
        ``n_images``, ``n_defect_images``, ``n_regions``, ``fpr_limit``.
    """
    s_img = _as_float(image_scores, "image_scores").ravel()
    y_img = np.asarray(image_labels).ravel().astype(bool)
    s_pix = _as_float(pixel_scores, "pixel_scores")
    m_pix = np.asarray(pixel_masks).astype(bool)
    if s_img.shape != y_img.shape:
        raise DataError(f"image_scores has {s_img.shape[0]} values but image_labels has {y_img.shape[0]}")
    if s_pix.ndim != 3 or s_pix.shape != m_pix.shape:
        raise DataError(f"pixel_scores {s_pix.shape} and pixel_masks {m_pix.shape} must both be (N, H, W)")
    if s_pix.shape[0] != s_img.shape[0]:
        raise DataError(f"{s_img.shape[0]} image scores but {s_pix.shape[0]} pixel maps")
    if not 0 < fpr_limit <= 1:
        raise DefectforgeError(f"fpr_limit must be in (0, 1], got {fpr_limit}")

    res: dict = {k: None for k in DETECTION_KEYS}
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3), int))[1] for m in m_pix)
    res.update(image_skipped=None, pixel_skipped=None, aupro_skipped=None,
               n_images=int(len(s_img)), n_defect_images=int(y_img.sum()),
               n_regions=int(n_regions), fpr_limit=fpr_limit)

    if 0 < y_img.sum() < len(y_img):
        r = binary_scores(s_img, y_img)
        res.update(image_auroc=r["auroc"], image_ap=r["ap"], image_f1max=r["f1max"])
    else:
        res["image_skipped"] = (
            f"needs both defective and good test images, got {int(y_img.sum())} defective of {len(y_img)}"
        )
    n_pos = int(m_pix.sum())
    if 0 < n_pos < m_pix.size:
        r = binary_scores(s_pix, m_pix)
        res.update(pixel_auroc=r["auroc"], pixel_ap=r["ap"], pixel_f1max=r["f1max"])
        res["aupro"] = aupro(s_pix, m_pix, fpr_limit)
    else:
        reason = f"needs both defect and defect-free pixels, got {n_pos} defect pixels of {m_pix.size}"
        res["pixel_skipped"] = reason
        res["aupro_skipped"] = reason
    return res
