"""CutPaste: the model-free self-supervised anomaly of Li et al. (CVPR 2021), as a baseline.

CutPaste makes an irregularity out of the defect-free image itself: it cuts a patch
from one place and pastes it at another, after a colour jitter. Two variants
(Sec. 3.1 and 3.2 of the paper, and its reference code):

* **patch** - a rectangle whose area is a uniform share ``area_ratio`` of the image
  (paper: [0.02, 0.15]) and whose aspect ratio is log-uniform in
  ``[aspect, 1/aspect]`` (paper: 0.3);
* **scar** - a thin rectangle ``scar_width`` x ``scar_height`` px (paper: width
  [2, 16], height [10, 25]) rotated by a uniform angle in ``[-scar_rotation,
  scar_rotation]`` (paper: 45 degrees).

Both jitter brightness, contrast, saturation and hue of the cut by up to ``jitter``
(paper: 0.1 each, torchvision's ``ColorJitter``). Here the paste is centred on the
stage's target mask (every method of defectforge paints where the target mask is),
clipped to stay inside the image, and the cut is taken from a random place of the
same image that does not overlap the paste when the image is big enough. The mask is
the pasted rectangle (rotated for a scar): exactly the pixels that changed.

Steps of :meth:`CutPaste.generate`:
  1. pick the variant (``variant: both`` draws patch or scar with probability 1/2);
  2. draw the cut's size (patch: area share + aspect; scar: width, height, angle);
  3. cut it from the image at a random place, colour-jitter it;
  4. paste it centred on the target mask; the mask is the pasted support.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import math

import numpy as np
from PIL import Image
from scipy import ndimage
from pydantic import Field, field_validator

from defectforge.methods.base import GenerationMethod, GenerationResult
from defectforge.methods.config import MethodConfig


def color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """torchvision ``ColorJitter(b, c, s, h)`` with b = c = s = h = ``strength``, drawn from ``rng``.

    Factors are uniform in [1 - strength, 1 + strength] (hue shift in [-strength,
    strength] of a turn); the four adjustments run in a random order, like torchvision's.
    """
    if strength <= 0:
        return patch
    import torch
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)
    ops = [
        lambda x: F.adjust_brightness(x, float(rng.uniform(1 - strength, 1 + strength))),
        lambda x: F.adjust_contrast(x, float(rng.uniform(1 - strength, 1 + strength))),
        lambda x: F.adjust_saturation(x, float(rng.uniform(1 - strength, 1 + strength))),
        lambda x: F.adjust_hue(x, float(rng.uniform(-min(strength, 0.5), min(strength, 0.5)))),
    ]
    for i in rng.permutation(4):
        t = ops[int(i)](t)
    return t.permute(1, 2, 0).numpy()


class CutPasteConfig(MethodConfig):
    """Model-free baseline: CutPaste (Li et al. 2021), a jittered cut of the image itself pasted elsewhere."""

    section: ClassVar[str] = "cutpaste"
    variant: Literal["patch", "scar", "both"] = "both"     # both: patch or scar with probability 1/2 (paper's 3-way)
    area_ratio: tuple[float, float] = (0.02, 0.15)          # patch area as a share of the image (paper)
    aspect: float = Field(0.3, gt=0, le=1)                  # patch aspect ratio log-uniform in [aspect, 1/aspect]
    scar_width: tuple[int, int] = (2, 16)                   # px (paper)
    scar_height: tuple[int, int] = (10, 25)                 # px (paper)
    scar_rotation: float = Field(45.0, ge=0, le=180)        # degrees, uniform in [-x, x]
    jitter: float = Field(0.1, ge=0, le=0.5)                # ColorJitter brightness = contrast = saturation = hue

    @field_validator("area_ratio", "scar_width", "scar_height", mode="before")
    @classmethod
    def _pair_from_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML and JSON have lists, no tuples

    @field_validator("area_ratio", "scar_width", "scar_height")
    @classmethod
    def _range(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"need 0 < low <= high, got {list(v)}")
        return v


class CutPaste(GenerationMethod):
    name = "cutpaste"
    config_class = CutPasteConfig
    own_mask = True

    def mask_origin_of(self, result: GenerationResult) -> str:
        return f"cutpaste-{result.metadata['variant']}"

    def __init__(self, config: CutPasteConfig | None = None):
        super().__init__(config or CutPasteConfig())

    def fit(self, defects, defect: str) -> None:  # noqa: ARG002 - CutPaste needs no real defect
        """Nothing to learn: the anomaly is made from the defect-free image itself."""

    def _size(self, variant: str, H: int, W: int, rng: np.random.Generator) -> tuple[int, int, float]:
        """(height, width, angle) of the cut. Sec. 3.1 (patch) and 3.2 (scar)."""
        c = self.config
        if variant == "patch":
            area = float(rng.uniform(*c.area_ratio)) * H * W
            log_a = float(rng.uniform(math.log(c.aspect), math.log(1.0 / c.aspect)))
            aspect = math.exp(log_a)  # w / h
            w = int(round(math.sqrt(area * aspect)))
            h = int(round(math.sqrt(area / aspect)))
            return max(1, min(h, H)), max(1, min(w, W)), 0.0
        w = int(rng.integers(c.scar_width[0], c.scar_width[1] + 1))
        h = int(rng.integers(c.scar_height[0], c.scar_height[1] + 1))
        angle = float(rng.uniform(-c.scar_rotation, c.scar_rotation))
        return max(1, min(h, H)), max(1, min(w, W)), angle

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:  # noqa: ARG002
        rng = np.random.default_rng(seed)
        H, W = image.shape[:2]
        c = self.config
        # 1. variant
        variant = c.variant if c.variant != "both" else ("patch" if rng.random() < 0.5 else "scar")
        # 2. size
        h, w, angle = self._size(variant, H, W, rng)
        # 3. cut from a random place, colour jitter
        sy, sx = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        cut = color_jitter(image[sy : sy + h, sx : sx + w], rng, c.jitter)
        alpha = np.ones((h, w), bool)
        if angle:
            # nearest neighbour for both, so no fill colour leaks into the pasted pixels
            cut = np.asarray(Image.fromarray(cut).rotate(angle, resample=Image.NEAREST, expand=True))
            alpha = np.asarray(Image.fromarray(alpha.astype(np.uint8) * 255).rotate(angle, resample=Image.NEAREST, expand=True)) >= 128
            if cut.shape[0] > H or cut.shape[1] > W:  # a rotated scar wider than a tiny image: crop its centre
                oy, ox = max(0, (cut.shape[0] - H) // 2), max(0, (cut.shape[1] - W) // 2)
                cut, alpha = cut[oy : oy + H, ox : ox + W], alpha[oy : oy + H, ox : ox + W]
        ph, pw = alpha.shape
        # 4. paste centred on the target mask, clipped inside the image
        cy, cx = (int(round(v)) for v in ndimage.center_of_mass(mask)) if mask.any() else (H // 2, W // 2)
        y0, x0 = int(np.clip(cy - ph // 2, 0, H - ph)), int(np.clip(cx - pw // 2, 0, W - pw))
        out = image.copy()
        region = out[y0 : y0 + ph, x0 : x0 + pw]
        region[alpha] = cut[alpha]
        full = np.zeros((H, W), bool)
        full[y0 : y0 + ph, x0 : x0 + pw] = alpha
        changed = full & np.any(out != image, axis=-1)  # the mask is the pasted support; a no-op paste stays marked
        return GenerationResult(
            image=out,
            mask=full,
            metadata={"variant": variant, "cut_from": [sy, sx], "pasted_at": [y0, x0], "size": [h, w], "angle": angle,
                      "changed_pixels": int(changed.sum())},
        )
