"""The detector's resolution, patches, normalisation and score pool, chosen from the data.

A detector that squashes a 250 x 600 px image with 10 px defects to a 64 px short side
never sees a defect wider than 3 px, and a 9 x 9 score pool averages those away: on
Magnetic Tile it did not learn (real-only image AUROC 0.4-0.5) at settings that suit the
built-in sample's 128 px images. What made it learn there (experiments/magnetic-tile-detector/magnetic-tile-detector-spread.md)
follows from two sizes measured on the real training split of a category:

- ``S``, the median short side of its images, and
- ``D``, the size of its smallest defects: per defect type, the median over its training
  images of the defect's equivalent diameter sqrt(4 area / pi); then the smallest type's.

Each ``auto`` value resolves as follows (an explicit value in params is used as it is):

- ``scale``: ``None`` (short side = ``size``) when that keeps ``D`` at >= ``MIN_DEFECT_PX``
  px, else the factor that does: ``MIN_DEFECT_PX / D`` (at most 1, at 2 decimals). Magnetic
  Tile: S = 253 px, D = 11.8 px (blowholes): x 0.43, a 5 px blowhole; the built-in sample
  (128 px, D >= 10 px): ``None``, its whole 64 px images.
- ``patch``: ``size`` px crops when the resized images' short side is at least
  ``PATCH_FROM`` x ``size`` (training on whole large images costs more and balances defect
  and background pixels worse), else ``None`` (whole images).
- ``norm``: ``batch`` when training on patches (one per-channel affine, the same on a patch
  and on a whole image at evaluation), ``group`` on whole images.
- ``score_pool``: the largest odd window that fits in the resized smallest defect
  (``D`` x factor), 1 to ``MAX_POOL``: a larger window averages a small defect away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_DEFECT_PX = 5.0  # the smallest types' median defect, across, after resizing
PATCH_FROM = 1.5     # train on size-px patches when the resized short side >= this x size
MAX_POOL = 9         # the image score's pool never exceeds the built-in default


def data_sizes(pairs: Sequence[tuple[np.ndarray, np.ndarray]], types: Sequence[str]) -> dict:
    """``short_side`` (S: median short side of the images, px) and ``defect_px`` (D: the smallest
    over defect types of the median equivalent diameter of a training image's defect, px; None
    without a defect image) of a category's real training pairs, ``types`` their defect types."""
    short = float(np.median([min(im.shape[:2]) for im, _ in pairs])) if len(pairs) else 0.0
    per_type: dict[str, list[float]] = {}
    for (_, m), t in zip(pairs, types):
        a = int(np.count_nonzero(m))
        if a:
            per_type.setdefault(t, []).append(math.sqrt(4 * a / math.pi))
    medians = {t: float(np.median(v)) for t, v in sorted(per_type.items())}
    return {"short_side": short, "defect_px": min(medians.values()) if medians else None,
            "defect_px_by_type": {t: round(v, 2) for t, v in medians.items()}}


def resolve(p, sizes: dict):
    """``p`` (:class:`~defectforge.params.detector.DetectorParams`) with every ``auto`` replaced by its
    value for data of these ``sizes`` (:func:`data_sizes`)."""
    S, D = sizes["short_side"], sizes["defect_px"]
    scale = p.scale
    if scale == "auto":
        need = MIN_DEFECT_PX / D if D else 0.0  # the factor that keeps the smallest defects MIN_DEFECT_PX across
        by_size = p.size / S if S else 1.0
        scale = None if by_size >= need else min(1.0, math.ceil(need * 100) / 100)
    factor = (p.size / S if S else 1.0) if scale is None else scale
    patch = p.patch
    if patch == "auto":
        patch = p.size if S * factor >= PATCH_FROM * p.size else None
    norm = p.norm if p.norm != "auto" else "batch" if patch is not None else "group"
    pool = p.score_pool
    if pool == "auto":
        across = (D or 0.0) * factor
        pool = max(1, min(MAX_POOL, int(across) if int(across) % 2 else int(across) - 1))
    return p.model_copy(update={"scale": scale, "patch": patch, "norm": norm, "score_pool": pool})


def resolved_fields(p) -> dict:
    """The values :func:`resolve` may change, for the record (details.json, report, card)."""
    return {k: getattr(p, k) for k in ("size", "scale", "patch", "norm", "score_pool")}
