"""The built-in generation methods' configurations: each is both the ``generate.<method>``
section of params.yaml and the frozen config a method object holds (and stores beside every
sample it makes). A method class names its model as ``config_class``; the generate section
is composed from the registry (:mod:`defectforge.params.generate`), so a new method may
declare its config model in its own file instead.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from defectforge.errors import ParamsError
from defectforge.params.loader import Section, describe

# the model-free baseline the reports, realism scores and the detector's synthetic protocol compare every method with
REFERENCE_METHOD = "copy-paste"


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


class InversionConfig(SamplingConfig):
    """DDIM inversion (Eq. 8), noise in the mask (Thm. 1), sampling with Eq. 9."""

    section: ClassVar[str] = "inversion"
    paste: Literal["crop", "mask"] = "mask"                 # mask: only (feathered) target-mask pixels change
    background: Literal["inverted", "sampled"] = "inverted"  # read the background from the Eq. 8 path, or Eq. 9's
    defect_background: Literal["inverted", "noised"] = "inverted"  # defect branch outside m: inverted path or noised z_0 (Eq. 6)


class BlendedConfig(SamplingConfig):
    """AdaBLDM: free denoising, latent blending, pixel blending, decoder adaptation."""

    section: ClassVar[str] = "blended"
    free_fraction: float = Field(0.52, ge=0, lt=1)  # first share of steps denoised free from pure noise (reference: 26 of 50)
    edit_fraction: float = Field(0.1, ge=0, lt=1)   # last share of steps with image editing (reference: 5 of 50)
    trimap: bool = True                             # clip the mask to the estimated object foreground
    adapt_steps: int = Field(200, ge=0, le=10000)   # online decoder adaptation, AdamW steps (reference: 200; 0 = off)
    adapt_lr: float = Field(1e-4, gt=0, le=1)       # (reference: 1e-4)
    adapt_weight: float = Field(100.0, ge=0, le=1e6)  # weight of the background term against the in-mask term (reference: 100)
    paste: Literal["crop", "mask"] = "crop"         # crop: the adapted decoder's whole crop (reference); mask: only m_d
    control: bool = True                            # feed the trimap to the fine-tune's ControlNet when it has one (false: ablation)

    @model_validator(mode="after")
    def _stages_fit(self) -> "BlendedConfig":
        if self.free_fraction + self.edit_fraction > 1:
            raise ValueError(f"free_fraction + edit_fraction must be <= 1, got {self.free_fraction} + {self.edit_fraction}")
        return self


class DefectDiffuConfig(DiffusionConfig):
    """DefectDiffu: double-free guidance (Eq. 4) inside the target mask, mask from the
    defect tokens' cross-attention averaged over the last steps, binarised by an iterative threshold."""

    section: ClassVar[str] = "defectdiffu"
    w_p: float = Field(1.0, ge=0, le=20)                    # Eq. 4: product (background) perturbation scale
    w_d: float = Field(2.0, ge=0, le=20)                    # Eq. 4: defect perturbation scale (defect strength)
    attention_fraction: float = Field(0.1, gt=0, le=1)      # last share of steps averaged for the mask (paper: last 100 of 1000)
    mask_source: Literal["attention", "module", "target"] = "attention"  # result.mask: binarised attention share | the mask
                                                            # generation module's M_pre (paper, Eq. 6; finetune.mask_module > 0) | the target
    threshold: Literal["iterative", "fixed"] = "iterative"  # iterative (Ridler-Calvard) threshold, or threshold_value
    threshold_value: float = Field(0.5, ge=0, le=1)         # the fixed threshold (threshold: fixed)
    threshold_tol: float = Field(1e-4, gt=0, le=0.1)        # convergence of the iterative threshold


class AnomalyDiffusionConfig(DiffusionConfig):
    """AnomalyDiffusion: blended diffusion (Eq. 1) conditioned on the spatial anomaly embedding
    e = {e_a, E(m)} (trained by finetune.anomaly_embedding), with adaptive attention re-weighting (Eq. 7-8)."""

    section: ClassVar[str] = "anomalydiffusion"
    reweight: bool = True                                   # adaptive attention re-weighting (Eq. 7-8); False: the w/o-AAR ablation
    reweight_max: float = Field(1.5, ge=1, le=10)           # upper clamp of w_m (the authors' code: 1.5; weights lie in [1, max])
    reweight_dilation: float = Field(8.0, ge=0, le=64)      # mask dilation r(t) = (t + 100) * this / 1000 px on a 32-px latent (authors: 8)
