"""What the diffusion methods share: model caching per defect type, the crop
around the target mask at the model's resolution, tensor conversion, paste-back,
and the attention map in image coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from defectforge.diffusion.models import DiffusionComponents, load_pipeline_components
from defectforge.errors import DataError, DefectforgeError
from defectforge.masks.crop import CropBox, crop_box, extract, feather_mask, paste_float, resize_image, whole_box


def check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image must be uint8 (H, W, 3), got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        raise DataError(f"mask must be (H, W) = {image.shape[:2]}, got {getattr(mask, 'shape', type(mask))}")
    if not mask.astype(bool).any():
        raise DataError("target mask is empty: nothing to generate")


class ModelCache:
    """Loads components lazily: one directory for every defect (a pretrained SD dir,
    whose text encoder knows any defect name) or a {defect: directory} mapping, in ``dtype``
    (generate.precision)."""

    def __init__(self, checkpoint: str | Path | dict | DiffusionComponents, device: str = "auto", dtype: torch.dtype = torch.float32):
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, DiffusionComponents] = {}

    def get(self, defect: str) -> DiffusionComponents:
        key = defect if isinstance(self.checkpoint, dict) else "*"
        if key not in self._loaded:
            if isinstance(self.checkpoint, DiffusionComponents):
                self._loaded[key] = self.checkpoint
            elif isinstance(self.checkpoint, dict):
                if defect not in self.checkpoint:
                    raise DefectforgeError(f"no fine-tuned checkpoint for defect type {defect!r} (have: {sorted(self.checkpoint)})")
                self._loaded[key] = load_pipeline_components(self.checkpoint[defect], self.device, self.dtype)
            else:
                self._loaded[key] = load_pipeline_components(self.checkpoint, self.device, self.dtype)
            self._loaded[key].unet.eval()
        return self._loaded[key]

    def sha256(self, defect: str | None = None) -> str | None:
        try:
            if defect is not None:
                return self.get(defect).checkpoint_sha256()
            if isinstance(self.checkpoint, dict):
                import hashlib

                h = hashlib.sha256()
                for d in sorted(self.checkpoint):
                    h.update(d.encode() + self.get(d).checkpoint_sha256().encode())
                return h.hexdigest()
            return self.get("*").checkpoint_sha256()
        except DefectforgeError:
            return None


CHECKPOINT_INDEX = "checkpoints.json"  # the finetune stage's index: {"<category>/<defect>": {"path": ...}}


def category_checkpoints(finetune_dir: str | Path, category: str) -> dict[str, str]:
    """{defect type: checkpoint directory} of one category, from the finetune stage's index."""
    import json

    index = json.loads((Path(finetune_dir) / CHECKPOINT_INDEX).read_text())
    return {k.split("/", 1)[1]: str(Path(finetune_dir) / v["path"]) for k, v in index.items() if k.split("/", 1)[0] == category}


@dataclass
class Crop:
    box: CropBox
    image: np.ndarray  # uint8 (r, r, 3)
    mask: np.ndarray  # bool (r, r)
    x: torch.Tensor  # (1, 3, r, r) in [-1, 1]
    m: torch.Tensor  # (1, 1, r, r) in {0, 1}


@dataclass
class SampleRow:
    """One sample of a method's batched sampler: its latents (batch 1 each), its own generator,
    and the per-sample options of :func:`~defectforge.diffusion.ddim.bound_eps` (``bound``,
    ``gray``, ``chroma``) and of the background reset (``soft``: the feathered mask that
    replaces ``m`` there). A method adds its own fields in a subclass; they are keyword-only
    (``@dataclass(kw_only=True)``), since these fields have defaults."""

    z0: torch.Tensor
    m: torch.Tensor
    generator: torch.Generator
    bound: float | tuple = 0.0
    gray: bool = False
    soft: torch.Tensor | None = None
    chroma: tuple | None = None


def make_crop(comps: DiffusionComponents, image: np.ndarray, mask: np.ndarray, crop: bool, context: float) -> Crop:
    res = comps.resolution
    box = crop_box(mask, res, context) if crop else whole_box(mask.shape)
    img, m = extract(image, mask, box, res)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(comps.device)
    mt = torch.from_numpy(m)[None, None].float().to(comps.device)
    return Crop(box, img, m, x, mt)


def to_uint8(x: torch.Tensor, gray: bool = False) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 (H, W, 3).

    ``gray``: the source is grayscale (R = G = B, e.g. Magnetic Tile), so the output is
    projected onto the gray axis (channel mean): an RGB model must not put colour
    into a grayscale product.
    """
    x = x[0].detach().float().cpu().clamp(-1, 1)
    if gray:
        x = x.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def is_gray(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def paste_back(image: np.ndarray, generated: np.ndarray, box: CropBox, only: np.ndarray | None = None,
               alpha: np.ndarray | None = None) -> np.ndarray:
    """Write ``generated`` (model resolution) into ``box`` of a copy of ``image``.

    ``only`` (bool, image size): replace just these pixels (pixel-level blending);
    ``alpha`` (float in [0, 1], image size, e.g. :func:`~defectforge.masks.crop.feather_mask`):
    soft blending round(alpha * generated + (1 - alpha) * image); otherwise the whole box.
    Pixels outside the box, outside ``only``, or where ``alpha`` is 0 keep their bytes.
    """
    out = image.copy()
    ys, xs = box.slices()
    gen = resize_image(generated, (box.height, box.width))
    if alpha is not None:
        a = np.clip(alpha[ys, xs].astype(np.float32), 0, 1)[..., None]
        region = out[ys, xs]
        mixed = np.clip(np.rint(a * gen.astype(np.float32) + (1 - a) * region.astype(np.float32)), 0, 255).astype(np.uint8)
        out[ys, xs] = np.where(a > 0, mixed, region)
    elif only is None:
        out[ys, xs] = gen
    else:
        sel = only[ys, xs]
        region = out[ys, xs]
        region[sel] = gen[sel]
        out[ys, xs] = region
    return out


def soft_masks(comps: DiffusionComponents, crop: Crop, mask: np.ndarray, sigma: float) -> tuple[torch.Tensor, np.ndarray]:
    """Feathered blending weights: (latent-size tensor (1, 1, h, w), image-size float32 (H, W)).

    The latent weights come from the crop's pixel mask (feathered at model resolution,
    then max-pooled to the latent grid like :meth:`DiffusionComponents.latent_mask`);
    the image weights from the full-resolution mask, so the paste touches no pixel
    farther than ``feather_radius(sigma)`` from it. ``sigma`` <= 0: the binary masks.
    """
    soft = torch.from_numpy(feather_mask(crop.mask, sigma))[None, None].to(comps.device)
    s = comps.vae_scale_factor
    latent = soft if s == 1 else torch.nn.functional.max_pool2d(soft, kernel_size=s, stride=s)
    return latent, feather_mask(mask, sigma)


def attention_to_image(att: torch.Tensor, mask: np.ndarray, box: CropBox) -> np.ndarray:
    """Crop-resolution defect attention (r, r) -> float32 (H, W) in [0, 1], zero outside the box."""
    a = att.detach().float().cpu().clamp(0, 1).numpy()
    return paste_float(mask.shape, a, box).clip(0, 1)
