"""Target masks on defect-free images: where a new defect goes and what shape it has.

Like AnomalyDiffusion's mask generation and the DDIM-inversion paper's "target masks",
shapes come from the real training masks of the defect type; here they are augmented
(flip, rotation, scale) and placed on a plausible part of the normal image: inside
its foreground (the object), never across the border.

The foreground estimate is deliberately simple and explainable: industrial images
show the part against a darker or brighter background, so Otsu's threshold on the
blurred gray image splits the two, and the part is the class that covers the image
centre. When the split is not convincing (the part fills the frame, as a texture
does; either class under 20 % of the image) the whole image is foreground.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def estimate_foreground(image: np.ndarray, min_fraction: float = 0.2) -> np.ndarray:
    """Bool (H, W) mask of the object in ``image`` (uint8 HxWx3)."""
    from skimage.filters import threshold_otsu

    gray = image.astype(np.float32).mean(axis=2)
    blurred = ndimage.gaussian_filter(gray, sigma=max(1.0, min(gray.shape) / 64))
    if float(blurred.max() - blurred.min()) < 1e-3:
        return np.ones(gray.shape, bool)
    fg = blurred > threshold_otsu(blurred)
    h, w = gray.shape
    centre = fg[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()
    if centre < 0.5:
        fg = ~fg
    frac = fg.mean()
    # A texture (or a part filling the frame) has no convincing two-class split.
    separation = abs(blurred[fg].mean() - blurred[~fg].mean()) if 0 < frac < 1 else 0.0
    if frac < min_fraction or frac > 1 - min_fraction / 4 or separation < 0.15 * blurred.std() * 4:
        return np.ones(gray.shape, bool)
    fg = ndimage.binary_opening(fg, iterations=2)
    fg = ndimage.binary_fill_holes(fg)
    return fg


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
    """Randomly flipped, rotated and scaled copy of a bool shape, cropped to its bbox."""
    out = shape.astype(np.float32)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if flip and rng.random() < 0.5:
        out = out[::-1, :]
    angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
    if angle:
        out = ndimage.rotate(out, angle, order=1, reshape=True, mode="constant")
    scale = float(rng.uniform(*scale_range))
    if max_size is not None:
        fit = min(max_size[0] / out.shape[0], max_size[1] / out.shape[1], 1e9)
        scale = min(scale, fit)
    if abs(scale - 1.0) > 1e-6:
        out = ndimage.zoom(out, scale, order=1)
    out = out > 0.5
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
