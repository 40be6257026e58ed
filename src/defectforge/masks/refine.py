"""Mask refinement from the defect tokens' cross-attention (DDIM-inversion Eq. 13).

    m*_ij = 1  if Resize(m' * A_def)_ij >= 1/2,   0 otherwise                  (13)

``A_def`` is the defect tokens' share of the cross-attention (see
:mod:`defectforge.diffusion.attention`), averaged over layers and the sampling
steps and already resized (bilinear) to the image; ``m'`` the target mask. The
result is then lightly cleaned: a binary closing then opening with a disk of
``radius`` pixels, and intersected with the target mask again, so the refined mask
is always inside the target mask.

    >>> import numpy as np
    >>> target = np.zeros((8, 8), bool); target[2:6, 2:6] = True
    >>> att = np.zeros((8, 8), np.float32); att[3:6, 3:6] = 0.9
    >>> int(refine_mask(att, target, radius=0).sum())
    9
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from defectforge.errors import DataError


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def refine_mask(attention: np.ndarray, target_mask: np.ndarray, threshold: float = 0.5, radius: int = 1) -> np.ndarray:
    """bool (H, W) refined mask, a subset of ``target_mask`` (Eq. 13 + morphology)."""
    if attention.shape != target_mask.shape:
        raise DataError(f"attention map {attention.shape} and target mask {target_mask.shape} differ in size")
    target = target_mask.astype(bool)
    refined = (np.where(target, attention, 0.0) >= threshold) & target  # Eq. 13
    if radius > 0 and refined.any():
        se = _disk(radius)
        refined = ndimage.binary_closing(refined, structure=se)
        refined = ndimage.binary_opening(refined, structure=se)
    return refined & target


def difference_mask(
    normal: np.ndarray, generated: np.ndarray, target_mask: np.ndarray, fraction: float = 0.5, min_change: float = 8.0, radius: int = 1
) -> np.ndarray:
    """Where the generation actually changed the normal image inside the target mask.

    Not Eq. 13: an image-space alternative for models whose cross-attention carries no
    defect evidence (fine-tuned without ``finetune.attention_loss``, the defect tokens'
    share is flat at about 1/2; see experiments/eq13-attention/eq13-attention.md). A target pixel is kept when its
    absolute change (mean over channels) is at least ``fraction`` of the largest change
    inside the target; nothing is kept when that largest change is below ``min_change``
    gray levels (nothing was painted). Same morphology as :func:`refine_mask`; the
    result is a subset of ``target_mask``.
    """
    if normal.shape != generated.shape or normal.shape[:2] != target_mask.shape:
        raise DataError(f"difference_mask: shapes differ ({normal.shape}, {generated.shape}, {target_mask.shape})")
    target = target_mask.astype(bool)
    diff = np.abs(generated.astype(np.float32) - normal.astype(np.float32))
    diff = diff.mean(axis=2) if diff.ndim == 3 else diff
    top = float(diff[target].max()) if target.any() else 0.0
    if top < min_change:
        return np.zeros_like(target)
    return refine_mask(diff / top, target, threshold=fraction, radius=radius)
