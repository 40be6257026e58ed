"""The one random augmentation of defect shapes (and, for copy-paste, their pixels).

Flip (each axis with probability 1/2), rotation by a uniform angle in
``[-max_rotation, max_rotation]`` (the canvas grows to hold it), then a uniform
scale in ``scale_range`` capped so the result fits ``max_size``. The draws happen in
that order, so one ``rng`` state gives one transform. The mask is interpolated
bilinearly and thresholded at 1/2; pixels are interpolated bilinearly with edge
replication (no black corners: the mask decides what is used).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def random_transform(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    pixels: np.ndarray | None = None,
    max_rotation: float = 180.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    flip: bool = True,
    max_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray | None, np.ndarray]:
    """(transformed pixels or None, transformed bool mask); both have the same (H, W)."""
    alpha = mask.astype(np.float32)
    for axis in (1, 0):
        if flip and rng.random() < 0.5:
            alpha = np.flip(alpha, axis)
            pixels = np.flip(pixels, axis) if pixels is not None else None
    angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
    if angle:
        alpha = ndimage.rotate(alpha, angle, order=1, reshape=True, mode="constant")
        if pixels is not None:
            pixels = ndimage.rotate(pixels, angle, axes=(0, 1), order=1, reshape=True, mode="nearest")
    scale = float(rng.uniform(*scale_range))
    if max_size is not None:
        scale = min(scale, max_size[0] / alpha.shape[0], max_size[1] / alpha.shape[1])
    if abs(scale - 1.0) > 1e-6:
        alpha = ndimage.zoom(alpha, scale, order=1)
        if pixels is not None:
            pixels = ndimage.zoom(pixels, (scale, scale) + (1,) * (pixels.ndim - 2), order=1, mode="nearest")
    return pixels, alpha > 0.5
