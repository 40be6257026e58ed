"""Where the object is in an image: the one foreground estimate of defectforge.

Used by target-mask placement (a new defect goes on the part, never on the
background) and by AdaBLDM's trimap (stage 1 of ``blended``). Industrial images
show a part against a darker or brighter background: Otsu's threshold on the
blurred grey image splits the two, and the part is the class that does *not*
dominate the image border. When the border is mixed (a texture, or a part filling
the frame) the whole image is the object; tiny specks are dropped; an estimate
under 2 % of the image counts as failed and also gives the whole image.

    >>> import numpy as np
    >>> im = np.zeros((64, 64, 3), np.uint8); im[16:48, 16:48] = 200
    >>> fg = estimate_foreground(im)
    >>> bool(fg[32, 32]), bool(fg[2, 2])
    (True, False)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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
