"""How close a set of defect masks is to the real ones: area, elongation and position.

Each mask gives three features (:func:`mask_features`):

* **area** - log10 of the mask's share of the image (a decade apart = 1.0);
* **elongation** - 1 - sqrt(l_min / l_max) of its pixel coordinates' covariance
  eigenvalues: 0 for a disc, towards 1 for a line (cracks, scars);
* **position** - its centroid relative to the object's bounding box
  (:func:`defectforge.masks.target.relative_position`) and its distance to the box's
  nearest edge, 0 on an edge and 0.5 in the middle (Magnetic Tile's Fray defects sit on
  the edges).

:func:`mask_distances` compares two sets with the 1-D Wasserstein distance of each
feature (scipy), position being the mean over relative y, relative x and edge distance.
0 means the same distribution; use real-vs-real (two halves of the real masks) as the
floor on small sets.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from defectforge.masks.foreground import estimate_foreground
from defectforge.masks.target import relative_position


def elongation(mask: np.ndarray) -> float:
    """1 - sqrt(l_min / l_max) of the covariance of the mask's pixel coordinates (0: disc, -> 1: line)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 2:
        return 0.0
    lam = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) / 12.0)  # + a pixel's own spread
    return float(1.0 - np.sqrt(max(lam[0], 0.0) / lam[1]))


def mask_features(mask: np.ndarray, foreground: np.ndarray | None = None, image: np.ndarray | None = None) -> dict[str, float]:
    """area (log10 share), elongation, rel_y, rel_x, edge (distance to the object box's nearest edge)."""
    if not mask.any():
        raise ValueError("an empty mask has no shape")
    if foreground is None:
        foreground = estimate_foreground(image) if image is not None else np.ones(mask.shape, bool)
    ry, rx = relative_position(mask, foreground)
    return {
        "area": float(np.log10(mask.mean())),
        "elongation": elongation(mask),
        "rel_y": ry,
        "rel_x": rx,
        "edge": float(min(ry, 1 - ry, rx, 1 - rx)),
    }


def mask_distances(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, float]:
    """Wasserstein-1 distances between two sets of :func:`mask_features`: area, elongation, position."""
    if not a or not b:
        raise ValueError("need masks on both sides")

    def w(key: str) -> float:
        return float(wasserstein_distance([f[key] for f in a], [f[key] for f in b]))

    return {
        "area": w("area"),
        "elongation": w("elongation"),
        "position": float(np.mean([w("rel_y"), w("rel_x"), w("edge")])),
        "n": [len(a), len(b)],
    }
