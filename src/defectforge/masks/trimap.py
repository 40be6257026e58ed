"""Object foreground estimate and AdaBLDM's trimap (background / object / defect).

AdaBLDM guides generation with a trimap so that defects land on the object, never
on the background. Our foreground estimate is deliberately simple and
justified by how inspection images are taken: an object on a homogeneous,
contrasting background (MVTec objects, BTAD), or a texture that fills the frame
(magnetic tile, carpet, wood).

1. Blur the gray image (Gaussian, sigma = 2 px) and split it in two with Otsu's
   threshold.
2. The background is the class that holds at least ``border_share`` (80 %) of
   the image border; if neither class does, the image is a texture and all of it
   is object.
3. Object = the other class, holes filled, components smaller than 1 % of the
   image dropped. If that leaves less than 2 % of the image, fall back to "all
   object" (the estimate failed; say so rather than forbid every mask).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BACKGROUND, OBJECT, DEFECT = 0, 1, 2


def estimate_foreground(image: np.ndarray, border_share: float = 0.8, sigma: float = 2.0) -> np.ndarray:
    """bool (H, W): True on the object. ``image``: uint8 (H, W, 3) or (H, W)."""
    from skimage.filters import threshold_otsu

    gray = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    h, w = gray.shape
    blur = ndimage.gaussian_filter(gray, sigma)
    if blur.max() - blur.min() < 1.0:
        return np.ones((h, w), bool)
    bright = blur > threshold_otsu(blur)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    share_bright = border.mean()
    if share_bright >= border_share:
        obj = ~bright
    elif 1 - share_bright >= border_share:
        obj = bright
    else:
        return np.ones((h, w), bool)  # texture: the object fills the frame
    obj = ndimage.binary_fill_holes(obj)
    labels, n = ndimage.label(obj)
    if n:
        sizes = ndimage.sum(obj, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.01 * h * w) + 1
        obj = np.isin(labels, keep)
    if obj.mean() < 0.02:
        return np.ones((h, w), bool)
    return obj


def make_trimap(image: np.ndarray, mask: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W): 0 background, 1 object, 2 defect region (= mask on the object).

    A mask pixel off the object becomes background: defects are not placed off the
    object. If no mask pixel is on the object, the raw mask is kept as the defect
    region (the caller can see it from ``(trimap == 2) == mask``).
    """
    fg = estimate_foreground(image) if foreground is None else foreground.astype(bool)
    tri = np.where(fg, OBJECT, BACKGROUND).astype(np.uint8)
    on_object = mask & fg
    tri[on_object if on_object.any() else mask] = DEFECT
    return tri
