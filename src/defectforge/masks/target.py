"""Target masks on defect-free images: where a new defect goes and what shape it has.

Like AnomalyDiffusion's mask generation and the DDIM-inversion paper's "target masks",
shapes come from the real training masks of the defect type; here they are augmented
(flip, rotation, scale) and placed on a plausible part of the normal image: inside
its foreground (the object), never across the border.

The foreground is :func:`defectforge.masks.foreground.estimate_foreground` (the same
estimate as ``blended``'s trimap). ``placement: prior`` instead centres the shape on a
location drawn from where the type's real defects sit on the object
(:class:`LocationPrior`; AnomalyDiffusion and DefectDiffu generate masks without one,
so Fray defects land mid-tile).
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


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), inclusive, of a region's bounding box; the whole frame when empty."""
    if not region.any():
        return 0, region.shape[0] - 1, 0, region.shape[1] - 1
    ys, xs = np.nonzero(region)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def relative_position(mask: np.ndarray, foreground: np.ndarray) -> tuple[float, float]:
    """The mask's centroid relative to the object's bounding box: (0, 0) top-left, (1, 1) bottom-right."""
    y0, y1, x0, x1 = _box(foreground)
    cy, cx = ndimage.center_of_mass(mask)
    return float(np.clip((cy - y0) / max(y1 - y0, 1), 0, 1)), float(np.clip((cx - x0) / max(x1 - x0, 1), 0, 1))


class LocationPrior:
    """Where real defects of a type sit on the object, learned from the real training masks.

    Each real mask gives its centroid relative to its image's object box
    (:func:`relative_position`); a new location is a kernel-density draw: a random
    real position plus Gaussian noise of ``bandwidth`` (default: Scott's rule on the
    positions, between 1 % and 5 % of the box), clipped to the box. Fray defects on Magnetic Tile's edges stay on the
    edges; blowholes spread over the face.
    """

    def __init__(self, positions: np.ndarray, bandwidth: float | None = None):
        self.positions = np.asarray(positions, np.float64).reshape(-1, 2)
        if not len(self.positions):
            raise ValueError("a location prior needs at least one real mask")
        n = len(self.positions)
        if bandwidth is None:
            # Scott's rule per axis, capped at 5 % of the box: Scott's rule assumes one mode and would smear
            # defects on the two opposite edges (Fray) over the whole face; floored at 1 % for one real mask
            sd = self.positions.std(axis=0) if n > 1 else np.zeros(2)
            bandwidth = np.clip(sd * n ** (-1.0 / 6.0), 0.01, 0.05)
        self.bandwidth = np.broadcast_to(np.asarray(bandwidth, np.float64), (2,)).copy()

    @classmethod
    def fit(cls, masks: list[np.ndarray], images: list[np.ndarray], bandwidth: float | None = None) -> "LocationPrior":
        pos = [relative_position(m, estimate_foreground(im)) for m, im in zip(masks, images) if m.any()]
        return cls(np.array(pos), bandwidth)

    def sample(self, rng: np.random.Generator) -> tuple[float, float]:
        k = int(rng.integers(0, len(self.positions)))
        y, x = self.positions[k] + rng.normal(0.0, 1.0, 2) * self.bandwidth
        return float(np.clip(y, 0, 1)), float(np.clip(x, 0, 1))


def sample_target_mask(
    real_masks: list[np.ndarray],
    normal: np.ndarray,
    rng: np.random.Generator,
    *,
    max_rotation: float = 180.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    flip: bool = True,
    foreground: np.ndarray | None = None,
    placement: str = "foreground",
    prior: LocationPrior | None = None,
) -> tuple[np.ndarray, int]:
    """A target mask for ``normal`` from one of ``real_masks``; returns (mask, donor index).

    Real masks from images of another size are rescaled by the size ratio first. The
    shape is placed (``placement``) on the object's foreground (``foreground``), anywhere
    in the frame (``anywhere``), or centred on a draw of the type's :class:`LocationPrior`
    relative to the object's box (``prior``).
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
    h, w = shape.shape
    if placement == "prior":
        if prior is None:
            raise ValueError("placement 'prior' needs the type's LocationPrior")
        region = estimate_foreground(normal) if foreground is None else foreground
        y0, y1, x0, x1 = _box(region)
        ry, rx = prior.sample(rng)
        cy, cx = y0 + ry * (y1 - y0), x0 + rx * (x1 - x0)
        y, x = int(np.clip(round(cy - h / 2), 0, H - h)), int(np.clip(round(cx - w / 2), 0, W - w))
    elif placement == "anywhere":
        y, x = place_shape(shape, np.ones((H, W), bool), rng)
    elif placement == "foreground":
        region = estimate_foreground(normal) if foreground is None else foreground
        y, x = place_shape(shape, region, rng)
    else:
        raise ValueError(f"placement must be 'foreground', 'anywhere' or 'prior', got {placement!r}")
    mask = np.zeros((H, W), bool)
    mask[y : y + shape.shape[0], x : x + shape.shape[1]] = shape
    return mask, idx
