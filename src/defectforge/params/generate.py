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
from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from defectforge.params.loader import Section
from defectforge.params.methods import MethodConfig
from defectforge.params.needs import Placement, PlacementRules


def _registered() -> dict[str, type]:
    from defectforge.methods import get_method_class, registered_methods

    return {name: get_method_class(name) for name in registered_methods()}


METHOD_CLASSES = _registered()
# The method names params.yaml accepts (registry order: the order the error message lists them in)
MethodName = Literal[tuple(METHOD_CLASSES)]  # type: ignore[valid-type]
METHOD_NEEDS_CHECKPOINTS: dict[str, bool] = {name: bool(cls.needs_checkpoints) for name, cls in METHOD_CLASSES.items()}
# generate.<section> of each method: its name with "-" as "_"
METHOD_SECTIONS: dict[str, str] = {name: name.replace("-", "_") for name in METHOD_CLASSES}


class _GenerateCommon(PlacementRules, Section):
    """The knobs every method shares; :class:`GenerateParams` adds one section per registered method."""

    methods: list[MethodName] = Field(default_factory=lambda: ["copy-paste"], min_length=1)
    n_per_defect: int = Field(8, ge=1, le=100000)
    seed: int = 0
    shard_size: int = Field(4, ge=1, le=10000)
    # samples of one defect type per UNet call (diffusion methods; the model-free ones loop), formed within a
    # shard; > 1 is part of the diffusion methods' params hash: a batched UNet call changes the last bits
    batch_size: int = Field(1, ge=1, le=1024)
    workers: int = Field(1, ge=1, le=256)
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

    def method_config(self, method: str) -> MethodConfig:
        """The configuration of ``method`` (its section of this one)."""
        return getattr(self, method.replace("-", "_"))

    def model_needs(self) -> list[str]:
        """What the pretrain and finetune stages must build models for: the diffusion methods,
        and the mask models when target masks are generated (empty: nothing to train)."""
        return self.diffusion_methods() + (["mask-model"] if self.uses_generated_masks() else [])

    def diffusion_methods(self) -> list[str]:
        """The methods that need the pretrain and finetune stages' models."""
        return [m for m in self.methods if METHOD_NEEDS_CHECKPOINTS[m]]

    def method_sha256(self, method: str) -> str:
        """Hash of what determines one method's samples: the common knobs and its own section."""
        common = self.model_dump(mode="json", exclude={"methods", "batch_size", "workers", "scheduler", *METHOD_SECTIONS.values()})
        own = getattr(self, method.replace("-", "_"), None)
        blob = {"common": common, "method": method, "own": own.model_dump(mode="json") if own is not None else None}
        if self.batch_size > 1 and METHOD_NEEDS_CHECKPOINTS.get(method):  # a batched UNet call: other last bits, another sample
            blob["batch_size"] = self.batch_size
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


GenerateParams = create_model(
    "GenerateParams",
    __base__=_GenerateCommon,
    __module__=__name__,
    **{METHOD_SECTIONS[name]: (cls.config_class, cls.config_class()) for name, cls in METHOD_CLASSES.items()},
)
GenerateParams.__doc__ = "The generate section: the shared knobs and one section per registered method (its config model)."
