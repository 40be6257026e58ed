"""Target masks on defect-free images: where a new defect goes and what shape it has.

Like AnomalyDiffusion's mask generation and the DDIM-inversion paper's "target masks",
shapes come from the real training masks of the defect type; here they are augmented
(flip, rotation, scale) and placed on a plausible part of the normal image: inside
its foreground (the object), never across the border.

The foreground is :func:`defectforge.masks.foreground.estimate_foreground` (the same
estimate as ``blended``'s trimap).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from defectforge.masks.augment import random_transform
from defectforge.masks.foreground import estimate_foreground


def crop_to_bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def augment_shape(
    shape: np.ndarray,
    rng: np.random.Generator,
    *,
    max_rotation: float = 180.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    flip: bool = True,
    max_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Randomly flipped, rotated and scaled copy of a bool shape (:func:`random_transform`), cropped to its bbox."""
    _, out = random_transform(shape, rng, max_rotation=max_rotation, scale_range=scale_range, flip=flip, max_size=max_size)
    if not out.any():  # a thin shape can vanish when shrunk: keep its centre pixel
        out = np.zeros((1, 1), bool)
        out[0, 0] = True
    return crop_to_bbox(out)


def place_shape(
    shape: np.ndarray,
    region: np.ndarray,
    rng: np.random.Generator,
    tries: int = 200,
) -> tuple[int, int]:
    """Top-left (y, x) so that ``shape`` lies inside the image and mostly on ``region``."""
    H, W = region.shape
    h, w = shape.shape
    if h > H or w > W:
        raise ValueError(f"shape {h}x{w} larger than image {H}x{W}")
    best, best_cover = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))), -1.0
    for _ in range(tries):
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        cover = region[y : y + h, x : x + w][shape].mean()
        if cover >= 0.999:
            return y, x
        if cover > best_cover:
            best, best_cover = (y, x), cover
    return best


def sample_target_mask(
    real_masks: list[np.ndarray],
    normal: np.ndarray,
    rng: np.random.Generator,
    *,
    max_rotation: float = 180.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    flip: bool = True,
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """A target mask for ``normal`` from one of ``real_masks``; returns (mask, donor index).

    Real masks from images of another size are rescaled by the size ratio first.
    """
    H, W = normal.shape[:2]
    idx = int(rng.integers(0, len(real_masks)))
    src = real_masks[idx]
    shape = crop_to_bbox(src)
    ratio = min(H / src.shape[0], W / src.shape[1])
    if abs(ratio - 1.0) > 1e-6:
        shape = ndimage.zoom(shape.astype(np.float32), ratio, order=1) > 0.5
        shape = crop_to_bbox(shape) if shape.any() else np.ones((1, 1), bool)
    shape = augment_shape(
        shape, rng, max_rotation=max_rotation, scale_range=scale_range, flip=flip, max_size=(H - 2, W - 2)
    )
    region = estimate_foreground(normal) if foreground is None else foreground
    y, x = place_shape(shape, region, rng)
    mask = np.zeros((H, W), bool)
    mask[y : y + shape.shape[0], x : x + shape.shape[1]] = shape
    return mask, idx
