"""What every method's configuration shares: :class:`MethodConfig` (a frozen ``generate.<method>``
section of params.yaml, also the config a method object holds and stores beside every sample it
makes), the diffusion methods' :class:`DiffusionConfig` and the two samplers' :class:`SamplingConfig`.

Each method declares its own model beside its code (``config_class``; ``CopyPasteConfig`` in
:mod:`defectforge.methods.copy_paste`, ``DefectDiffuConfig`` in
:mod:`defectforge.methods.defectdiffu.config`, ...), so editing one method's config changes
that method's code hash only; the generate section is composed from the registry
(:mod:`defectforge.params.generate`). This module imports neither torch nor any method.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError

from defectforge.errors import ParamsError
from defectforge.params.loader import Section, describe

class _ConfigMeta(type(BaseModel)):
    """Direct construction (``InversionConfig(steps=0)``) raises :class:`ParamsError` naming
    ``<section>.<key>``; inside :func:`parse_params` the nested errors keep their full
    dotted path (``generate.inversion.steps``), because nested validation never calls this."""

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise ParamsError("; ".join(describe(e, cls.section) for e in exc.errors()[:5])) from None


class MethodConfig(Section, metaclass=_ConfigMeta):
    """A generation method's frozen configuration = its ``generate.<section>`` of params.yaml."""

    section: ClassVar[str] = "method"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class DiffusionConfig(MethodConfig):
    """What every diffusion method shares: DDIM steps, crop mode, x0 bounds, soft masks, device."""

    steps: int = Field(50, ge=1, le=1000)                   # DDIM steps (papers: 50)
    crop: bool = True                                       # False: whole image resized to the model resolution
    context: float = Field(1.5, ge=1, le=10)                # crop side >= context * defect extent
    clip_x0: bool = True                                    # bound x0^ to [-1, 1] in every step (pixel profile)
    latent_bound: float = Field(0.0, ge=0, le=100)          # the x0^ bound for latent profiles when clip_x0 (0: off)
    gray_steps: bool = True                                 # grey source: project x0^ onto the grey axis in every step
    chroma_steps: bool = True                               # colour source: bound x0^'s chroma to the crop's gamut
    feather: float = Field(1.5, ge=0, le=20)                # Gaussian sigma (px) of the soft masks; 0: binary
    real_range: bool = True                                 # pixel profile, with clip_x0: inside the mask x0^ stays within
                                                            # the type's real defects' value range (per channel quantiles)
    real_range_q: float = Field(0.005, ge=0, lt=0.5)        # ... the q and 1 - q quantiles of their in-mask pixels
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SamplingConfig(DiffusionConfig):
    """The DDIM-inversion paper's two samplers add the Eq. 4 guidance and Eq. 13's attention window."""

    guidance: float = Field(2.0, ge=0, le=20)               # w_d; 1.0 = no extra push along good -> defect
    attention_fraction: float = Field(0.5, gt=0, le=1)      # last share of steps whose attention is averaged (Eq. 13)
