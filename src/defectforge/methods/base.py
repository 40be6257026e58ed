"""The interface every generation method implements.

A method turns a defect-free image, a target mask and a defect type into a defect
image. It never reads params.yaml: its configuration is a frozen dataclass built by
the generate stage from the method's own params section, and stored (as JSON) beside
every sample it makes so the sample can be reproduced.

    result = method.generate(image, mask, defect="crack", seed=7)
    result.image        # uint8 (H, W, 3), same size as the input image
    result.mask         # bool (H, W): the raw target mask actually used
    result.attention    # float32 (H, W) in [0, 1] or None (defect-token attention)
    result.metadata     # JSON-able dict: what produced the sample

Randomness comes only from ``seed`` (a ``numpy.random.Generator`` / ``torch.Generator``
seeded from it), so one seed gives one output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class GenerationResult:
    image: np.ndarray
    mask: np.ndarray
    attention: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodConfig:
    """Base class of a method's frozen configuration."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


class GenerationMethod:
    """Base class. Subclasses set ``name`` and implement :meth:`generate`.

    ``fit`` is for methods that learn from real defects (the diffusion methods); the
    model-free baselines keep a reference to the real defects they were given.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig):
        self.config = config

    def fit(self, defects: list[tuple[np.ndarray, np.ndarray]], defect: str) -> None:
        """Learn (or remember) the real defects of one type: list of (image, mask)."""
        raise NotImplementedError

    def generate(self, image: np.ndarray, mask: np.ndarray, defect: str, seed: int) -> GenerationResult:
        raise NotImplementedError

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


class DiffusionMethod(GenerationMethod):
    """Shared plumbing of the diffusion methods: a config class and fine-tuned checkpoints.

    ``checkpoint`` is a finetune / tiny / diffusers directory, a hub id, or
    ``{defect type: directory}``; models load lazily on first use.
    """

    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig, checkpoint=None):
        super().__init__(config)
        from defectforge.diffusion.sampling import ModelCache

        self.models = ModelCache(checkpoint, config.device) if checkpoint is not None else None

    @classmethod
    def from_pretrained(cls, checkpoint, config: MethodConfig | None = None, device: str | None = None):
        config = config or cls.config_class()
        if device is not None and device != config.device:
            config = cls.config_class(**{**config.to_dict(), "device": device})
        return cls(config, checkpoint)

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.models.sha256() if self.models else None

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

    def _require_models(self) -> None:
        from defectforge.errors import ParamsError

        if self.models is None:
            raise ParamsError(f"{self.name}: no model checkpoint given (use {type(self).__name__}.from_pretrained)")


_REGISTRY: dict[str, type[GenerationMethod]] = {}
# Methods that need torch/diffusers register on first use, so the registry (and the
# manifest suite that checks method names) stays cheap to import.
_LAZY = {"inversion": "defectforge.methods.inversion", "blended": "defectforge.methods.blended"}


def register(cls: type[GenerationMethod]) -> type[GenerationMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[GenerationMethod]:
    from defectforge.errors import ParamsError

    # import side effect: registers the built-in methods
    import defectforge.methods  # noqa: F401

    if name not in _REGISTRY and name in _LAZY:
        import importlib

        importlib.import_module(_LAZY[name])
    if name not in _REGISTRY:
        raise ParamsError(f"generate.methods: unknown method {name!r}; allowed: {registered_methods()}")
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    import defectforge.methods  # noqa: F401

    return sorted(set(_REGISTRY) | set(_LAZY))
