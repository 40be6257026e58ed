"""Copy-paste: the model-free baseline every diffusion method must beat.

Cut a real training defect with its mask, paste it at a plausible place on a
defect-free image, blend the edge; the mask follows the pasted pixels. This is the
"Crop&Paste" baseline of the seed papers' comparisons (AnomalyDiffusion Tab. 1,
DefectDiffu Tab. 2).

Steps of :meth:`CopyPaste.generate`:
  1. pick a donor defect (image, mask) of the requested type (recorded: ``defect_source_index``
     in the metadata, the real image's id in the manifest's ``defect_source_id``);
  2. augment it: flip, rotation, scale (the same transform for pixels and mask);
  3. place it centred on the target mask, clipped to stay inside the image;
  4. match brightness: scale the donor (a per-channel gain in [0.5, 2]) so its surroundings
     have the target's local mean;
  5. alpha-blend with a feathered mask (Gaussian, ``feather`` px) - pixels outside
     the feathered support are the input's, bit for bit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy import ndimage
from pydantic import Field, field_validator

from defectforge.errors import DataError
from defectforge.masks.augment import random_transform
from defectforge.methods.base import GenerationMethod, GenerationResult
from defectforge.methods.config import MethodConfig


GAIN_RANGE = (0.5, 2.0)  # step 4's brightness gain, per channel


class CopyPasteConfig(MethodConfig):
    """Model-free baseline: cut a real defect with its mask and paste it on a normal image."""

    section: ClassVar[str] = "copy_paste"
    feather: float = Field(1.5, ge=0.0, le=20.0)          # Gaussian sigma (px) of the paste's alpha
    max_rotation: float = Field(180.0, ge=0.0, le=180.0)  # target mask and donor: rotation in [-x, x] degrees
    scale_range: tuple[float, float] = (0.8, 1.2)
    flip: bool = True
    match_brightness: bool = True
    margin: int = Field(4, ge=0, le=64)                   # px of context cut around each donor mask

    @field_validator("scale_range", mode="before")
    @classmethod
    def _pair_from_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML and JSON have lists, no tuples

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"need 0 < low <= high, got {list(v)}")
        return v

    def target_mask_options(self) -> dict[str, Any]:
        return {"max_rotation": self.max_rotation, "scale_range": tuple(self.scale_range), "flip": self.flip}


class CopyPaste(GenerationMethod):
    name = "copy-paste"
    config_class = CopyPasteConfig

    def __init__(self, config: CopyPasteConfig | None = None):
        super().__init__(config or CopyPasteConfig())
        self.donors: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.donor_sources: dict[str, list[int]] = {}

    def target_mask_options(self) -> dict:
        """The target mask gets the same augmentation knobs as the donor."""
        return self.config.target_mask_options()

    def fit(self, defects, defect: str) -> None:
        """Remember the real defects of one type as (pixel crop, mask crop) around each mask."""
        m = self.config.margin
        crops = []
        self.donor_sources[defect] = []  # donor i is defects[donor_sources[defect][i]] (empty masks are skipped)
        for k, (image, mask) in enumerate(defects):
            if not mask.any():
                continue
            self.donor_sources[defect].append(k)
            ys, xs = np.nonzero(mask)
            y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, mask.shape[0])
            x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, mask.shape[1])
            crops.append((image[y0:y1, x0:x1].astype(np.float32), mask[y0:y1, x0:x1].copy()))
        if not crops:
            raise DataError(f"copy-paste: no real training defects with a non-empty mask for defect type {defect!r}")
        self.donors[defect] = crops

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        if defect not in self.donors:
            raise DataError(f"copy-paste: defect type {defect!r} was not fitted")
        rng = np.random.default_rng(seed)
        H, W = image.shape[:2]
        donors = self.donors[defect]
        # 1. donor
        d = int(rng.integers(0, len(donors)))
        pixels, dmask = donors[d]
        # 2. augmentation
        c = self.config
        pixels, dmask = random_transform(dmask, rng, pixels=pixels, max_rotation=c.max_rotation, scale_range=tuple(c.scale_range), flip=c.flip, max_size=(H - 2, W - 2))
        if not dmask.any():
            dmask = np.zeros(dmask.shape, bool)
            dmask[dmask.shape[0] // 2, dmask.shape[1] // 2] = True
        h, w = dmask.shape
        # 3. placement: centre of the target mask, clipped inside the image
        if mask.any():
            cy, cx = (int(round(v)) for v in ndimage.center_of_mass(mask))
        else:
            cy, cx = H // 2, W // 2
        y0 = int(np.clip(cy - h // 2, 0, H - h))
        x0 = int(np.clip(cx - w // 2, 0, W - w))
        target = image[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        # 4. brightness: scale the donor so its surroundings get the target's local mean. A gain,
        #    not an offset: shading is multiplicative, so a pit keeps its depth relative to the
        #    surface; an offset pushes a dark pit pasted on darker brick below 0 (on the built-in
        #    sample, 32 % of such a sample's mask clipped to black)
        if self.config.match_brightness and (~dmask).any():
            gain = target[~dmask].mean(axis=0) / np.maximum(pixels[~dmask].mean(axis=0), 1.0)
            pixels = pixels * np.clip(gain, GAIN_RANGE[0], GAIN_RANGE[1])
        # 5. feathered alpha blend
        alpha = dmask.astype(np.float32)
        if self.config.feather > 0:
            alpha = np.maximum(ndimage.gaussian_filter(alpha, self.config.feather), alpha * 0.0)
            alpha = np.clip(alpha / max(alpha[dmask].min(), 1e-6), 0, 1) * (alpha > 1e-3)
        out = image.copy()
        blended = target * (1 - alpha[..., None]) + pixels * alpha[..., None]
        region = alpha > 0
        patch = out[y0 : y0 + h, x0 : x0 + w]
        patch[region] = np.clip(np.rint(blended[region]), 0, 255).astype(np.uint8)
        full_mask = np.zeros((H, W), bool)
        full_mask[y0 : y0 + h, x0 : x0 + w] = dmask
        return GenerationResult(
            image=out,
            mask=full_mask,
            attention=None,
            # defect_source_index: which of the real defects given to fit() was pasted; the generate
            # stage turns it into the manifest's defect_source_id (that real image's id)
            metadata={"donor_index": d, "defect_source_index": self.donor_sources[defect][d], "offset": [y0, x0]},
        )
