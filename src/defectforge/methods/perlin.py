"""Perlin-noise anomalies as DRAEM defines them (Zavrtanik et al., ICCV 2021, Sec. 3.3), as a baseline.

DRAEM simulates anomalies without any real defect:

* the **anomaly mask** M_a is 2-D Perlin noise P with a random lattice of
  (2^a, 2^b) cells, a, b uniform in {0, ..., ``max_scale_exp`` - 1} (reference code:
  ``perlin_scale = 6``), rotated by a uniform angle in [-90, 90] degrees and
  thresholded at ``threshold`` (0.5);
* the **anomaly source** A is a texture image augmented by 3 augmentations drawn
  without replacement from a list of 10 (gamma contrast, multiply-and-add
  brightness, sharpness, hue and saturation, solarize, posterize, invert,
  autocontrast, equalize, affine rotation);
* the **augmented image**, with beta uniform in [0, ``beta_max``] (0.8):

      I_a = (1 - M_a) * I + (1 - beta) * (M_a * A) + beta * (M_a * I)      (DRAEM Eq. 1)

DRAEM draws A from the DTD texture set, which cannot be downloaded here: the anomaly
source is a random real training image of the defect type (``source: defects``) or
the defect-free image itself (``source: self``), resized to the image. DRAEM places
M_a anywhere on the image (``placement: anywhere``, the default); ``placement: target``
keeps M_a inside the target mask's box grown by ``spread``, where the other methods
paint (the box then cuts the Perlin blobs with straight edges). DRAEM pastes colour
textures on grey objects too; with ``keep_gray`` (default) a grey input gets a grey
anomaly source, because colour on a grey part is what the per-sample gates reject.
The mask is M_a.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from pydantic import Field

from defectforge.errors import DataError
from defectforge.methods.base import GenerationMethod, GenerationResult
from defectforge.methods.config import MethodConfig


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient noise on a ``res`` lattice, in about [-1, 1] (DRAEM's ``rand_perlin_2d_np``).

    ``shape`` must be a multiple of ``res`` on both axes.
    """
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : res[0] / shape[0], 0 : res[1] : res[1] / shape[1]].transpose(1, 2, 0) % 1
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(s0, s1):
        return np.repeat(np.repeat(gradients[s0[0] : s0[1], s1[0] : s1[1]], d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        g = np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1)
        return (g * grad[: shape[0], : shape[1]]).sum(axis=-1)

    n00 = dot(tile([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile([0, -1], [1, None]), [0, -1])
    n11 = dot(tile([1, None], [1, None]), [-1, -1])
    t = fade(grid)
    lerp = lambda a, b, w: a + w * (b - a)  # noqa: E731
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, max_scale_exp: int, threshold: float) -> np.ndarray:
    """M_a: Perlin noise on a random (2^a, 2^b) lattice, rotated in [-90, 90] degrees, > ``threshold``."""
    a, b = (int(v) for v in rng.integers(0, max_scale_exp, 2))
    res = (2**a, 2**b)
    side = 2 ** max(max_scale_exp - 1, 0)
    padded = (math.ceil(shape[0] / side) * side, math.ceil(shape[1] / side) * side)
    noise = perlin_2d(padded, res, rng)[: shape[0], : shape[1]].astype(np.float32)
    angle = float(rng.uniform(-90, 90))
    noise = np.asarray(Image.fromarray(noise, mode="F").rotate(angle, resample=Image.BILINEAR, fillcolor=-1.0))
    return noise > threshold


def _augmentations():
    """DRAEM's 10 augmentations of the anomaly source (imgaug names), on PIL RGB images."""

    def gamma(im, r):
        g = np.asarray(im, np.float32) / 255.0
        gam = r.uniform(0.5, 2.0, size=3)  # per channel
        return Image.fromarray(np.clip(np.power(g, gam) * 255.0, 0, 255).astype(np.uint8))

    def mul_add(im, r):
        a = np.asarray(im, np.float32) * r.uniform(0.8, 1.2) + r.uniform(-30, 30)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def sharpness(im, r):
        return ImageEnhance.Sharpness(im).enhance(float(r.uniform(0.0, 2.0)))

    def hue_sat(im, r):
        hsv = np.asarray(im.convert("HSV"), np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(r.integers(-50, 51))) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] + int(r.integers(-50, 51)), 0, 255)
        return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")

    def solarize(im, r):
        return ImageOps.solarize(im, int(r.integers(32, 129))) if r.random() < 0.5 else im

    def posterize(im, r):
        return ImageOps.posterize(im, int(r.integers(4, 9)))

    def invert(im, r):  # noqa: ARG001
        return ImageOps.invert(im)

    def autocontrast(im, r):  # noqa: ARG001
        return ImageOps.autocontrast(im)

    def equalize(im, r):  # noqa: ARG001
        return ImageOps.equalize(im)

    def affine(im, r):
        return im.rotate(float(r.uniform(-45, 45)), resample=Image.BILINEAR)

    return [gamma, mul_add, sharpness, hue_sat, solarize, posterize, invert, autocontrast, equalize, affine]


AUGMENTATIONS = _augmentations()


def is_gray(image: np.ndarray, tol: int = 2) -> bool:
    """True when every pixel's channels agree within ``tol`` (a grey part stored as RGB)."""
    if image.ndim == 2 or image.shape[-1] == 1:
        return True
    i = image.astype(np.int16)
    return int(np.abs(i - i[..., :1]).max()) <= tol


def draem_blend(image: np.ndarray, source: np.ndarray, m_a: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM Eq. 1: I_a = (1 - M_a) * I + (1 - beta) * (M_a * A) + beta * (M_a * I), as uint8."""
    m = m_a[..., None].astype(np.float32)
    i, a = image.astype(np.float32), source.astype(np.float32)
    out = (1 - m) * i + (1 - beta) * (m * a) + beta * (m * i)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augment_source(source: np.ndarray, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    """A: the anomaly source after ``n`` of the 10 augmentations, drawn without replacement."""
    im = Image.fromarray(source)
    for i in rng.choice(len(AUGMENTATIONS), size=n, replace=False):
        im = AUGMENTATIONS[int(i)](im, rng)
    return np.asarray(im.convert("RGB"))


class PerlinConfig(MethodConfig):
    """Model-free baseline: DRAEM's Perlin-noise anomalies (Zavrtanik et al. 2021)."""

    section: ClassVar[str] = "perlin"
    max_scale_exp: int = Field(6, ge=1, le=8)               # lattice 2^a x 2^b, a, b in {0, ..., x-1} (DRAEM: 6)
    threshold: float = Field(0.5, ge=-1, lt=1)              # M_a = noise > threshold (DRAEM: 0.5)
    beta_max: float = Field(0.8, ge=0, le=1)                # beta uniform in [0, x] (DRAEM: 0.8)
    source: Literal["defects", "self"] = "defects"          # anomaly source A (DRAEM: DTD textures, not available offline)
    placement: Literal["target", "anywhere"] = "anywhere"   # anywhere: DRAEM; target: inside the target mask's grown box
    spread: float = Field(1.0, ge=0, le=10)                 # growth of the target box, as a share of its size
    keep_gray: bool = True                                  # grey input: grey anomaly source (DRAEM pastes colour)


class Perlin(GenerationMethod):
    name = "perlin"
    config_class = PerlinConfig
    own_mask = True

    def mask_origin_of(self, result: GenerationResult) -> str:  # noqa: ARG002
        return "perlin-noise"

    def __init__(self, config: PerlinConfig | None = None):
        super().__init__(config or PerlinConfig())
        self.sources: dict[str, list[np.ndarray]] = {}

    def fit(self, defects, defect: str) -> None:
        """Remember the real training images of the type as anomaly sources (DRAEM: DTD textures)."""
        self.sources[defect] = [np.asarray(img) for img, _ in defects]

    def _region(self, mask: np.ndarray) -> np.ndarray:
        """Where M_a may lie: the whole image, or the target mask's box grown by ``spread`` of its size."""
        H, W = mask.shape
        if self.config.placement == "anywhere" or not mask.any():
            return np.ones((H, W), bool)
        ys, xs = np.nonzero(mask)
        gy = int(round((ys.max() - ys.min() + 1) * self.config.spread / 2))
        gx = int(round((xs.max() - xs.min() + 1) * self.config.spread / 2))
        region = np.zeros((H, W), bool)
        region[max(ys.min() - gy, 0) : ys.max() + gy + 1, max(xs.min() - gx, 0) : xs.max() + gx + 1] = True
        return region

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        c = self.config
        rng = np.random.default_rng(seed)
        H, W = image.shape[:2]
        region = self._region(mask)
        # M_a: thresholded, rotated Perlin noise (redrawn a few times if it misses the region)
        for attempt in range(16):
            m_a = perlin_mask((H, W), rng, c.max_scale_exp, c.threshold) & region
            if m_a.any():
                break
        else:
            m_a = mask & region if mask.any() else region
        # A: the anomaly source, augmented
        if c.source == "defects":
            if not self.sources.get(defect):
                raise DataError(f"perlin: defect type {defect!r} was not fitted (source: defects needs its real training images)")
            pool = self.sources[defect]
            src = pool[int(rng.integers(0, len(pool)))]
        else:
            src = image
        src = np.asarray(Image.fromarray(src).convert("RGB").resize((W, H), Image.BILINEAR))
        a = augment_source(src, rng)
        if c.keep_gray and is_gray(image):
            a = np.repeat(np.asarray(Image.fromarray(a).convert("L"))[..., None], 3, axis=-1)
        beta = float(rng.uniform(0.0, c.beta_max))
        return GenerationResult(
            image=draem_blend(image, a, m_a, beta),  # DRAEM Eq. 1
            mask=m_a,
            metadata={"beta": beta, "source": c.source, "attempts": attempt + 1},
        )
