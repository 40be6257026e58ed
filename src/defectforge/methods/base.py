"""The interface every generation method implements.

A method turns a defect-free image, a target mask and a defect type into a defect
image. It never reads params.yaml: its configuration is its frozen
``generate.<method>`` section (the model its class names as ``config_class``, declared beside
it; the shared bases in :mod:`defectforge.methods.config`), stored (as JSON) beside every
sample it makes so the sample can be reproduced.

    result = method.generate(image, mask, defect="crack", seed=7)
    result.image        # uint8 (H, W, 3), same size as the input image
    result.mask         # bool (H, W): the raw target mask actually used
    result.attention    # float32 (H, W) in [0, 1] or None (defect-token attention)
    result.metadata     # JSON-able dict: what produced the sample

Randomness comes only from ``seed`` (a ``numpy.random.Generator`` / ``torch.Generator``
seeded from it), so one seed gives one output.

    results = method.generate_batch([BatchItem(image, mask, "crack", 7), ...])

makes several samples of one defect type together. Each keeps its own image, mask and
seed, and its random draws come from its own generator in the order ``generate`` draws
them, so no sample's noise depends on its neighbours. The default loops over
:meth:`GenerationMethod.generate` (the model-free methods); a diffusion method with a
batched sampler puts every sample's rows (guidance rows included) into one UNet call per
step. Floating point makes a batched UNet call differ from a batch-1 call in the last bits
(measured on the tiny UNet: max |eps| difference 2.5e-6, bitwise equal at batch 4 and 8
and independent of the neighbours' values), so a sample may differ from its batch-1 bytes
by a few uint8 levels on a few pixels; the generate stage makes the batch part of what
determines a sample (:mod:`defectforge.pipeline.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from defectforge.methods.config import MethodConfig


@dataclass
class BatchItem:
    """One sample of a batch: its normal image, target mask, defect type and seed."""

    image: np.ndarray
    mask: np.ndarray
    defect: str
    seed: int


@dataclass
class GenerationResult:
    image: np.ndarray
    mask: np.ndarray
    attention: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class GenerationMethod:
    """Base class. Subclasses set ``name`` and implement :meth:`generate`.

    ``fit`` is for methods that learn from real defects (the diffusion methods); the
    model-free baselines keep a reference to the real defects they were given.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # None: the sample's mask comes from the stage's target mask (an augmented real mask);
    # a method with its own mask model returns its mask_origin from mask_origin_of()
    own_mask: ClassVar[bool] = False
    # whether the method needs the pretrain and finetune stages' checkpoints
    needs_checkpoints: ClassVar[bool] = False

    def mask_origin_of(self, result: "GenerationResult") -> str | None:  # noqa: ARG002
        """The manifest's ``mask_origin`` of a sample whose mask this method made itself."""
        return None

    def __init__(self, config: MethodConfig):
        self.config = config

    @classmethod
    def for_stage(cls, config: MethodConfig, checkpoints=None) -> "GenerationMethod":
        """The method as the generate stage runs it (``checkpoints``: the finetune stage's folder)."""
        return cls(config)

    def prepare(self, category: str, defect: str, reals: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Get ready to make ``defect`` on ``category`` images (default: :meth:`fit` the reals)."""
        self.fit(reals, defect)

    def target_mask_options(self) -> dict[str, Any]:
        """Keyword options of :func:`defectforge.masks.target.sample_target_mask` for this method."""
        return {}

    def fit(self, defects: list[tuple[np.ndarray, np.ndarray]], defect: str) -> None:
        """Learn (or remember) the real defects of one type: list of (image, mask)."""
        raise NotImplementedError

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        raise NotImplementedError

    def generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """One result per item, in order (default: :meth:`generate` on each, the same bytes as batch 1)."""
        return [self.generate(it.image, it.mask, it.defect, it.seed) for it in items]

    @property
    def checkpoint_sha256(self) -> str | None:
        """Hash of the model weights the method used, or None for model-free methods."""
        return None

    def checkpoint_for(self, defect: str) -> str | None:
        """Hash of the weights that generate ``defect`` (a per-defect-type checkpoint where there is one)."""
        models = getattr(self, "models", None)
        if models is not None and hasattr(models, "sha256"):
            return models.sha256(defect)
        return self.checkpoint_sha256


def real_value_range(reals, q: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel, the ``q`` and ``1 - q`` quantiles of the in-mask pixels of the real
    defects ``[(image uint8 (H, W[, 3]), mask (H, W)), ...]``: two uint8 arrays of 3, or
    None when no real defect has a mask pixel."""
    pixels = []
    for image, mask in reals:
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        m = np.asarray(mask).astype(bool)
        if m.shape == img.shape[:2] and m.any():
            pixels.append(img[m][:, :3])
    if not pixels:
        return None
    px = np.concatenate(pixels).astype(np.float32)
    lo, hi = np.quantile(px, q, axis=0), np.quantile(px, 1 - q, axis=0)
    return np.floor(lo).astype(np.uint8), np.ceil(hi).astype(np.uint8)


class DiffusionMethod(GenerationMethod):
    """Shared plumbing of the diffusion methods: a config class and fine-tuned checkpoints.

    ``checkpoint`` is a finetune / tiny / diffusers directory, a hub id, or
    ``{defect type: directory}``; models load lazily on first use.
    """

    needs_checkpoints: ClassVar[bool] = True
    precision: str = "fp32"  # the dtype the models load in (generate.precision; set_precision)

    def __init__(self, config: MethodConfig, checkpoint=None):
        super().__init__(config)
        from defectforge.diffusion.sampling import ModelCache

        self.models = ModelCache(checkpoint, config.device) if checkpoint is not None else None
        self._finetuned: str | None = None
        self._caches: dict = {}
        self._real_range: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # defect type -> (lo, hi) uint8 per channel

    @classmethod
    def for_stage(cls, config: MethodConfig, checkpoints=None) -> "DiffusionMethod":
        from defectforge.errors import DataError

        if checkpoints is None:
            raise DataError(f"generate: method {cls.name!r} needs the finetune stage's checkpoints (--checkpoints)")
        method = cls(config)
        method._finetuned = str(checkpoints)
        return method

    def prepare(self, category: str, defect: str, reals) -> None:
        """Load ``category``'s fine-tuned checkpoints (one per defect type) from the finetune
        folder, and note the value range of the type's real defects (:meth:`x0_bound`)."""
        rng = real_value_range(reals, self.config.real_range_q) if reals else None
        if rng is not None:
            self._real_range[defect] = rng
        else:
            self._real_range.pop(defect, None)
        if self._finetuned is None:
            return
        from defectforge.diffusion.sampling import ModelCache, category_checkpoints

        if category not in self._caches:
            self._caches[category] = ModelCache(category_checkpoints(self._finetuned, category), self.config.device, self.dtype)
        self.models = self._caches[category]

    @classmethod
    def from_pretrained(cls, checkpoint, config: MethodConfig | None = None, device: str | None = None, precision: str = "fp32"):
        config = config or cls.config_class()
        if device is not None and device != config.device:
            config = cls.config_class(**{**config.to_dict(), "device": device})
        return cls(config, checkpoint).set_precision(precision)

    def set_precision(self, precision: str) -> "DiffusionMethod":
        """Load the models in ``precision`` (fp32 | bf16 | fp16; fp16 on CUDA only), before they load."""
        from defectforge.diffusion.models import precision_dtype

        precision_dtype(precision, self.config.device)  # refuses fp16 off CUDA
        self.precision = precision
        if self.models is not None:
            self.models.dtype = self.dtype
        return self

    @property
    def dtype(self):
        from defectforge.diffusion.models import DTYPES

        return DTYPES[self.precision]

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.models.sha256() if self.models else None

    def x0_bound(self, defect: str, pixel: bool, weights) -> float | tuple:
        """The bound on x0^ in every DDIM step (:func:`~defectforge.diffusion.ddim.bound_eps`):
        off (0.0) without ``clip_x0``; [-1, 1] on the pixel profile and ``latent_bound`` on
        latent ones; on the pixel profile with ``real_range`` and a prepared defect type, the
        per-pixel maps of :func:`~defectforge.diffusion.ddim.range_bounds`: inside the soft
        mask ``weights`` x0^ stays within the type's real in-mask value range (a hole's floor
        no darker, its rim no brighter, than real holes), outside it within [-1, 1]."""
        cfg = self.config
        if not cfg.clip_x0:
            return 0.0
        if not pixel:
            return cfg.latent_bound
        rng = self._real_range.get(defect) if cfg.real_range else None
        if rng is None:
            return 1.0
        import torch

        from defectforge.diffusion.ddim import range_bounds

        lo, hi = (torch.from_numpy(v.astype(np.float32) / 127.5 - 1) for v in rng)
        return range_bounds(lo, hi, weights)

    def bound_metadata(self, defect: str, bound) -> dict[str, Any]:
        """What :meth:`x0_bound` used, for a sample's metadata (JSON)."""
        if isinstance(bound, tuple):
            lo, hi = self._real_range[defect]
            return {"x0_bound": 1.0, "x0_real_range": {"lo": [int(v) for v in lo], "hi": [int(v) for v in hi], "q": self.config.real_range_q}}
        return {"x0_bound": bound}

    def _metadata(self, comps, crop, defect: str, seed: int, gray: bool, **extra) -> dict[str, Any]:
        """What produced a sample: config, model, crop (stored beside it for reproduction)."""
        return {
            "method": self.name,
            "config": self.config.to_dict(),
            "defect": defect,
            "seed": int(seed),
            "profile": comps.profile,
            "model": comps.source,
            "crop_box": crop.box.to_dict(),
            "resolution": comps.resolution,
            "grayscale_output": gray,
            **extra,
        }

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        """One sample: a batch of one (a subclass writes :meth:`_generate_batch`, or overrides this)."""
        return self.generate_batch([BatchItem(image, mask, defect, seed)])[0]

    def generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """One result per item, in order; items of each defect type go to :meth:`_generate_batch` together."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.defect, []).append(i)
        out: list[GenerationResult | None] = [None] * len(items)
        for idx in groups.values():
            for i, result in zip(idx, self._generate_batch([items[i] for i in idx])):
                out[i] = result
        return out  # type: ignore[return-value]

    def _generate_batch(self, items: list[BatchItem]) -> list[GenerationResult]:
        """Samples of one defect type (default: :meth:`generate` on each; a batched sampler overrides this)."""
        return [self.generate(it.image, it.mask, it.defect, it.seed) for it in items]

    def _crop(self, comps, it: BatchItem):
        """Step 1 of a diffusion sample: its inputs checked, its bool mask, its own generator and the
        crop around the mask at the model's resolution (the config's ``crop`` and ``context``)."""
        import torch

        from defectforge.diffusion.sampling import check_inputs, make_crop

        check_inputs(it.image, it.mask)
        mask = it.mask.astype(bool)
        generator = torch.Generator().manual_seed(int(it.seed))
        return mask, generator, make_crop(comps, it.image, mask, self.config.crop, self.config.context)

    def _require_models(self) -> None:
        from defectforge.errors import ParamsError

        if self.models is None:
            raise ParamsError(f"{self.name}: no model checkpoint given (use {type(self).__name__}.from_pretrained)")
