"""The ``generate`` section: what the generate stage makes, and each method's own section.

The method sections (``generate.copy_paste``, ``generate.inversion``, ...) and the names
``generate.methods`` accepts come from the method registry (:mod:`defectforge.methods`):
each registered class names its config model (``config_class``) and whether it needs the
pretrain and finetune stages' checkpoints (``needs_checkpoints``), so a new method is one
file and one registry line, and its section appears here by itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from defectforge.params.loader import Section
from defectforge.methods.config import MethodConfig
from defectforge.params.needs import Placement, PlacementRules


def _registered() -> dict[str, type]:
    from defectforge.methods import get_method_class, registered_methods

    return {name: get_method_class(name) for name in registered_methods()}




class _GenerateCommon(PlacementRules, Section):
    """The knobs every method shares; :func:`compose` adds one section per method and the ids
    ``methods`` accepts."""

    # {method id: whether it needs the pretrain and finetune stages' checkpoints}, set by compose()
    needs_checkpoints: ClassVar[dict[str, bool]] = {}
    methods: list[str] = Field(default_factory=lambda: ["copy-paste"], min_length=1)
    n_per_defect: int = Field(8, ge=1, le=100000)
    seed: int = 0
    shard_size: int = Field(4, ge=1, le=10000)
    # samples of one defect type per UNet call (diffusion methods; the model-free ones loop), formed within a
    # shard; > 1 is part of the diffusion methods' params hash: a batched UNet call changes the last bits
    batch_size: int = Field(1, ge=1, le=1024)
    workers: int = Field(1, ge=1, le=256)
    # the dtype the diffusion methods load their models in (fp16 needs CUDA; bf16 runs on CPU too); not fp32 is part
    # of their params hash: half-precision weights give other samples (docs/gpu-memory-plan.md)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    scheduler: str = ""
    # where target masks go: on the object's foreground | anywhere | drawn from where the type's real defects sit |
    # generated (shape and place) by the type's mask model (AnomalyDiffusion Eq. 9; finetune.mask_model)
    target_placement: Placement = "prior"
    # per defect type ("crack", or "category/crack" for one category's), overriding target_placement for that type:
    # defect types differ in where they sit (Magnetic Tile: breaks on the tile's edge, blowholes on its face)
    target_placement_by_type: dict[str, Placement] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _batch_fits_shard(self) -> "_GenerateCommon":
        if self.batch_size > self.shard_size:
            raise ValueError(f"batch_size {self.batch_size} must be <= shard_size {self.shard_size} (batches are formed within a shard)")
        return self

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, v: list[str]) -> list[str]:
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"each method may be listed once, {', '.join(map(repr, dup))} is repeated")
        return v

    def check_precision(self) -> None:
        """Refuse ``precision`` where a diffusion method's device cannot run it (fp16 off CUDA), in one line."""
        from defectforge.diffusion.models import precision_dtype

        for name in self.diffusion_methods():
            precision_dtype(self.precision, self.method_config(name).device)

    def method_config(self, method: str) -> MethodConfig:
        """The configuration of ``method`` (its section of this one)."""
        return getattr(self, method.replace("-", "_"))

    def model_needs(self) -> list[str]:
        """What the pretrain and finetune stages must build models for: the diffusion methods,
        and the mask models when target masks are generated (empty: nothing to train)."""
        return self.diffusion_methods() + (["mask-model"] if self.uses_generated_masks() else [])

    def diffusion_methods(self) -> list[str]:
        """The methods that need the pretrain and finetune stages' models."""
        return [m for m in self.methods if self.needs_checkpoints[m]]

    def method_sha256(self, method: str) -> str:
        """Hash of what determines one method's samples: the common knobs and its own section."""
        sections = {m.replace("-", "_") for m in self.needs_checkpoints}
        common = self.model_dump(mode="json", exclude={"methods", "batch_size", "workers", "scheduler", "precision", *sections})
        own = getattr(self, method.replace("-", "_"), None)
        blob = {"common": common, "method": method, "own": own.model_dump(mode="json") if own is not None else None}
        if self.batch_size > 1 and self.needs_checkpoints.get(method):  # a batched UNet call: other last bits, another sample
            blob["batch_size"] = self.batch_size
        if self.precision != "fp32" and self.needs_checkpoints.get(method):  # other weights' dtype, other samples
            blob["precision"] = self.precision
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def compose(classes: dict[str, type]) -> type[_GenerateCommon]:
    """The generate section's model for the methods ``classes`` (``{id: class}``, in the order
    errors list them): the shared knobs, ``methods`` accepting those ids, and one section per
    method (``generate.<id with - as _>``, its class's ``config_class``)."""
    ids = Literal[tuple(classes)]  # type: ignore[valid-type]
    model = create_model(
        "GenerateParams",
        __base__=_GenerateCommon,
        __module__=__name__,
        methods=(list[ids], Field(default_factory=lambda: ["copy-paste"], min_length=1)),
        **{name.replace("-", "_"): (cls.config_class, cls.config_class()) for name, cls in classes.items()},
    )
    model.needs_checkpoints = {name: bool(cls.needs_checkpoints) for name, cls in classes.items()}
    model.__doc__ = "The generate section: the shared knobs and one section per registered method (its config model)."
    return model


# the registered methods, in registry order (the order an error lists them in)
METHOD_CLASSES = _registered()
GenerateParams = compose(METHOD_CLASSES)
METHOD_NEEDS_CHECKPOINTS: dict[str, bool] = dict(GenerateParams.needs_checkpoints)
