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
from defectforge.masks.foreground import estimate_foreground

BACKGROUND, OBJECT, DEFECT = 0, 1, 2


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
