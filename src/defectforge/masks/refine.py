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
