"""Typed, validated params.yaml: the one place every knob is declared.

Every knob of every stage lives in params.yaml and is read through these models.
The generation methods' configurations (:class:`CopyPasteConfig`,
:class:`InversionConfig`, :class:`BlendedConfig`) are declared here too, once: they
are both the ``generate.<method>`` sections and the frozen config a method object
holds (and stores beside every sample it makes).
Unknown keys, wrong types and out-of-range values stop the stage with one line that
names the dotted key and what is allowed::

    params.yaml: split.scheme: got 'thirds'; allowed: 'third' or 'kfold'

Types are strict (pydantic strict mode): ``"3"`` is not an integer, ``true`` is not a
count, ``"off"`` is not a boolean; an integer is accepted where a float is expected
(``lr: 1``), a YAML list where a pair is (``scale_range: [0.8, 1.2]``). ``dvc exp run -S
key=value`` writes its value into params.yaml typed by YAML, so ``-S generate.seed=3``
arrives as an integer. The params file itself must be UTF-8 YAML without duplicate keys
and without aliases (``*name``: an alias "bomb" expands to gigabytes).

A stage reads only its own section (``load_params(path).split``), and dvc.yaml lists
only those keys, so changing a knob reruns only the stages that use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defectforge.errors import ParamsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def image_glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be an ``image_glob`` (matched inside each class folder), or None."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not pattern.strip():
        return "must be a non-empty pattern such as '*' or 'images/*'"
    if PurePosixPath(pattern).is_absolute() or PureWindowsPath(pattern).is_absolute() or pattern.startswith("~"):
        return "must be relative to each class folder, not an absolute path"
    if ".." in PurePosixPath(pattern.replace("\\", "/")).parts:
        return "may not climb out of the class folder with '..'"
    return None


MASK_RULE_FIELDS = ("stem", "name", "suffix", "category", "defect_type")


def mask_rule_parts(rule: str) -> list[tuple[str, str | None]]:
    """``rule`` as (literal text, field name or None) pairs; only the documented fields, plainly named.

    ``{{`` and ``}}`` are literal braces. A field with an attribute or index (``{stem.x}``,
    ``{stem[0]}``), a conversion (``{stem!r}``) or a format spec (``{stem:>5000}``) is refused:
    the rule only ever substitutes a name's text.
    """
    import string

    fields = " ".join("{" + f + "}" for f in MASK_RULE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(rule))
    except ValueError as exc:
        raise ParamsError(f"data.mask_rule {rule!r}: invalid pattern ({exc}); fields: {fields}") from None
    parts = []
    for literal, field, spec, conversion in parsed:
        if field is not None and (field not in MASK_RULE_FIELDS or spec or conversion):
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ParamsError(f"data.mask_rule {rule!r}: {shown} is not a field; use only {fields} (plain names, "
                              "no attributes, indexes, conversions or format specs)")
        parts.append((literal, field))
    return parts


class SampleParams(_Section):
    """The built-in sample (MVTec AD layout, made deterministically)."""

    seed: int = 0
    size: int = Field(128, ge=32, le=1024)
    n_train_good: int = Field(24, ge=2)
    n_test_good: int = Field(8, ge=1)
    n_defect: int = Field(12, ge=3)


class DataParams(_Section):
    """Where the real images are and how they are laid out."""

    layout: Literal["mvtec", "folder", "magnetic-tile"] = "mvtec"
    root: str = "data/sample"
    image_glob: str = "*"
    mask_rule: str = "{stem}_mask.png"
    mask_threshold: int = Field(128, ge=1, le=255)
    categories: list[str] = []
    defect_types: list[str] = []
    on_bad: Literal["fail", "skip"] = "fail"  # bad samples: stop ingest listing all | leave out, list in the quarantine file

    @field_validator("image_glob")
    @classmethod
    def _relative_glob(cls, v: str) -> str:
        problem = image_glob_problem(v)
        if problem:
            raise ValueError(f"{v!r}: {problem}")
        return v

    @field_validator("mask_rule")
    @classmethod
    def _plain_mask_rule(cls, v: str) -> str:
        try:
            mask_rule_parts(v)
        except ParamsError as exc:
            raise ValueError(str(exc).removeprefix("data.mask_rule ")) from None
        return v


class SplitParams(_Section):
    """AnomalyDiffusion's lowest-third rule or the DDIM-inversion paper's k-fold."""

    scheme: Literal["third", "kfold"] = "third"
    k: int = Field(2, ge=2, le=10)
    fold: int = Field(0, ge=0)
    seed: int = 0
    good_test_fraction: float = Field(0.3, gt=0.0, lt=1.0)


class PretrainParams(_Section):
    """The base model. tiny: trained here from scratch on defect-free crops (CPU);
    pretrained: any diffusers Stable Diffusion directory or hub id (GPU workers)."""

    profile: Literal["tiny", "pretrained"] = "tiny"
    base: str = ""
    steps: int = Field(600, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, le=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1, le=64)   # torch intra-op threads (tiny profile): part of the result, not the machine's


class FinetuneParams(_Section):
    """Per defect type: the DDIM-inversion paper's disentangled training (Eq. 5-7, 10-11)."""

    mode: Literal["unet", "lora"] = "unet"
    steps: int = Field(150, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float | None = Field(None, gt=0, le=1)
    token_lr: float = Field(5e-3, gt=0, le=1)
    lora_rank: int = Field(4, ge=1, le=256)
    prior_fraction: float = Field(0.5, ge=0, lt=1)
    loss_norm: Literal["all", "area"] = "all"  # Eq. 5 norms: mean over all pixels | over the mask / background pixels
    attention_loss: float = Field(0.0, ge=0, le=100)  # weight of the attention loss (joint defect share -> m', for Eq. 13)
    attention_rows: Literal["defect", "defect+mask"] = "defect"  # C_1 defect rows only, or also the C_2 rows
    # DefectDiffu Algorithm 1 (double-free condition dropout): p_1 = product condition -> null, p_2 = defect -> good
    cond_dropout_product: float = Field(0.0, ge=0, lt=1)  # p_1 (paper: 0.2); > 0 also learns the null tokens Eq. 4 needs
    cond_dropout_defect: float = Field(0.0, ge=0, lt=1)   # p_2 (paper: 0.2)
    aal: bool = False                                     # DefectDiffu's adaptive attention-enhanced loss (Eq. 7-10)
    aal_alpha: float = Field(1e-3, gt=0, le=1)            # alpha of Eq. 8 (paper: 0.001)
    tdia: bool = False                                    # DefectDiffu's TDIA: background / defect / fusion parts, each its own prompt
    mask_module: float = Field(0.0, ge=0, le=100)         # lambda of Eq. 11: > 0 trains DefectDiffu's mask generation module (Eq. 6)
    mask_module_lr: float = Field(1e-3, gt=0, le=1)       # its learning rate (it starts from scratch)
    # AdaBLDM's spatial guidance: a trimap ControlNet trained after the UNet (UNet frozen), used by method blended
    trimap_control: bool = False
    trimap_control_steps: int = Field(0, ge=0, le=1_000_000)  # its training steps (0: finetune.steps)
    # AnomalyDiffusion masked textual inversion (Eq. 5-6) on the frozen base: anomaly tokens e_a + spatial encoder E
    anomaly_embedding: bool = False                       # also train e_a and E per defect type (method anomalydiffusion)
    anomaly_tokens: int = Field(4, ge=1, le=64)           # k, tokens of the anomaly embedding e_a
    spatial_tokens: int = Field(4, ge=1, le=64)           # n, tokens of the spatial embedding e_s = E(m)
    anomaly_steps: int = Field(200, ge=1, le=1_000_000)   # optimisation steps of Eq. 6
    anomaly_lr: float = Field(5e-3, gt=0, le=1)           # Adam learning rate of e_a and E
    # AnomalyDiffusion mask generation (Eq. 9), per defect type, for generate.target_placement: generated
    mask_model: Literal["none", "diffusion", "textual-inversion"] = "none"  # diffusion: a small mask UNet (tiny profile)
    mask_model_steps: int = Field(1500, ge=1, le=1_000_000)
    mask_model_resolution: int = Field(64, ge=8, le=1024)  # whole-image masks squashed to R x R (diffusion kind)
    mask_tokens: int = Field(4, ge=1, le=64)              # k', tokens of the mask embedding e_m (textual-inversion kind)
    mask_model_flip: bool = True                          # left-right / up-down flips of the few real masks
    mask_model_downsample: Literal["cover", "area"] = "cover"  # cover: a pixel is defect when any pixel under it is
    # memory (docs/gpu-memory-plan.md): autocast precision (weights, gradients and AdamW states stay fp32; fp16 needs
    # CUDA), activation checkpointing, 8-bit AdamW (bitsandbytes, optional)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=64)                  # processes fine-tuning defect types side by side (same bytes as 1)


class _ConfigMeta(type(BaseModel)):
    """Direct construction (``InversionConfig(steps=0)``) raises :class:`ParamsError` naming
    ``<section>.<key>``; inside :func:`parse_params` the nested errors keep their full
    dotted path (``generate.inversion.steps``), because nested validation never calls this."""

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise ParamsError("; ".join(_describe(e, cls.section) for e in exc.errors()[:5])) from None


class MethodConfig(_Section, metaclass=_ConfigMeta):
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


class _DiffusionConfig(MethodConfig):
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


class _SamplingConfig(_DiffusionConfig):
    """The DDIM-inversion paper's two samplers add the Eq. 4 guidance and Eq. 13's attention window."""

    guidance: float = Field(2.0, ge=0, le=20)               # w_d; 1.0 = no extra push along good -> defect
    attention_fraction: float = Field(0.5, gt=0, le=1)      # last share of steps whose attention is averaged (Eq. 13)


class InversionConfig(_SamplingConfig):
    """DDIM inversion (Eq. 8), noise in the mask (Thm. 1), sampling with Eq. 9."""

    section: ClassVar[str] = "inversion"
    paste: Literal["crop", "mask"] = "mask"                 # mask: only (feathered) target-mask pixels change
    background: Literal["inverted", "sampled"] = "inverted"  # read the background from the Eq. 8 path, or Eq. 9's
    defect_background: Literal["inverted", "noised"] = "inverted"  # defect branch outside m: inverted path or noised z_0 (Eq. 6)


class BlendedConfig(_SamplingConfig):
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


class DefectDiffuConfig(_DiffusionConfig):
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


class AnomalyDiffusionConfig(_DiffusionConfig):
    """AnomalyDiffusion: blended diffusion (Eq. 1) conditioned on the spatial anomaly embedding
    e = {e_a, E(m)} (trained by finetune.anomaly_embedding), with adaptive attention re-weighting (Eq. 7-8)."""

    section: ClassVar[str] = "anomalydiffusion"
    reweight: bool = True                                   # adaptive attention re-weighting (Eq. 7-8); False: the w/o-AAR ablation
    reweight_max: float = Field(1.5, ge=1, le=10)           # upper clamp of w_m (the authors' code: 1.5; weights lie in [1, max])
    reweight_dilation: float = Field(8.0, ge=0, le=64)      # mask dilation r(t) = (t + 100) * this / 1000 px on a 32-px latent (authors: 8)


# The method names params.yaml accepts, and whether each needs the pretrain + finetune
# stages' checkpoints; the registry (defectforge.methods) maps each name to its module.
METHOD_NEEDS_CHECKPOINTS: dict[str, bool] = {"copy-paste": False, "cutpaste": False, "perlin": False, "inversion": True, "blended": True,
                                           "defectdiffu": True, "anomalydiffusion": True}
MethodName = Literal["copy-paste", "cutpaste", "perlin", "inversion", "blended", "defectdiffu", "anomalydiffusion"]
# the model-free baseline the reports and realism scores compare every method with
REFERENCE_METHOD = "copy-paste"


def resolve_placement(by_type: dict[str, str], default: str, category: str, defect_type: str) -> str:
    """A defect type's target placement: ``by_type["category/type"]``, else ``by_type["type"]``, else ``default``."""
    return by_type.get(f"{category}/{defect_type}", by_type.get(defect_type, default))


class GenerateParams(_Section):
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
    target_placement: Literal["foreground", "anywhere", "prior", "generated"] = "prior"
    # per defect type ("crack", or "category/crack" for one category's), overriding target_placement for that type:
    # defect types differ in where they sit (Magnetic Tile: breaks on the tile's edge, blowholes on its face)
    target_placement_by_type: dict[str, Literal["foreground", "anywhere", "prior", "generated"]] = Field(default_factory=dict)
    copy_paste: CopyPasteConfig = CopyPasteConfig()
    cutpaste: CutPasteConfig = CutPasteConfig()
    perlin: PerlinConfig = PerlinConfig()
    inversion: InversionConfig = InversionConfig()
    blended: BlendedConfig = BlendedConfig()
    defectdiffu: DefectDiffuConfig = DefectDiffuConfig()
    anomalydiffusion: AnomalyDiffusionConfig = AnomalyDiffusionConfig()

    @model_validator(mode="after")
    def _batch_fits_shard(self) -> "GenerateParams":
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

    def placement_for(self, category: str, defect_type: str) -> str:
        """The target placement of one defect type: ``target_placement_by_type`` ("category/type",
        then "type"), else ``target_placement``."""
        return resolve_placement(self.target_placement_by_type, self.target_placement, category, defect_type)

    def uses_generated_masks(self) -> bool:
        """Whether any defect type's target masks come from its mask model."""
        return self.target_placement == "generated" or "generated" in self.target_placement_by_type.values()

    def diffusion_methods(self) -> list[str]:
        """The methods that need the pretrain and finetune stages' models."""
        return [m for m in self.methods if METHOD_NEEDS_CHECKPOINTS[m]]

    def method_sha256(self, method: str) -> str:
        """Hash of what determines one method's samples: the common knobs and its own section."""
        common = self.model_dump(mode="json", exclude={"methods", "batch_size", "workers", "scheduler", "copy_paste", "cutpaste", "perlin", "inversion", "blended", "defectdiffu", "anomalydiffusion"})
        own = getattr(self, method.replace("-", "_"), None)
        blob = {"common": common, "method": method, "own": own.model_dump(mode="json") if own is not None else None}
        if self.batch_size > 1 and METHOD_NEEDS_CHECKPOINTS.get(method):  # a batched UNet call: other last bits, another sample
            blob["batch_size"] = self.batch_size
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class RefineParams(_Section):
    """Mask refinement from the defect tokens' cross-attention (DDIM-inversion Eq. 13)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    radius: int = Field(1, ge=0, le=10)
    min_area_ratio: float = Field(0.1, ge=0.0, le=1.0)
    fallback: Literal["difference", "raw"] = "difference"
    difference_fraction: float = Field(0.5, gt=0.0, lt=1.0)


class QualityParams(_Section):
    """Image-quality metrics per (category, defect type, method) and the gates."""

    backbone: str = "random-vgg11-seed0"
    weights: str | None = None
    lpips_backbone: str = "random-alexnet-seed0"
    lpips_weights: str | None = None
    size: int = Field(64, ge=16, le=512)
    crop_context: float = Field(2.0, ge=1.0, le=10.0)
    c2st_folds: int = Field(5, ge=2, le=20)      # classifier two-sample test: stratified k-fold
    c2st_size: int = Field(32, ge=8, le=256)     # crops resized to this for the two-sample test
    c2st_repeats: int = Field(10, ge=1, le=1000)  # repeated k-fold (fresh subsample and folds each time), accuracy = their mean
    seed: int = 0                                # seeds the two-sample test's folds and real-vs-real halves
    gates: dict[str, float | int] = {}
    set_gates: dict[str, float | None] = {"min_pass_rate": 0.5}


class DetectorParams(_Section):
    """The U-Net detector trained real-only and real+synthetic, paired by seed, evaluated on held-out real images."""

    # mixed: real + synthetic defects + normals against real-only (DDIM-inversion paper, Sec. 4.3);
    # synthetic: synthetic defects + normals only, no real defect in training, against copy-paste's
    # set (AnomalyDiffusion, "Anomaly generation for anomaly detection"); both: the two in one run
    protocol: Literal["mixed", "synthetic", "both"] = "mixed"
    # steps: epochs x ceil(n_real / batch_size) steps for every run (counted from the real training split);
    # epochs: epochs passes over each run's own training union (more synthetic data, more steps; the papers')
    budget: Literal["steps", "epochs"] = "steps"
    epochs: int = Field(8, ge=1, le=1000)        # passes over the real training set (budget steps) or each run's union (budget epochs)
    batch_size: int = Field(8, ge=1, le=512)
    lr: float = Field(1e-3, gt=0, le=1)          # peak; cosine decay to 0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=100)
    # auto (scale, patch, norm, score_pool): chosen per category from its real training images' short side and its
    # smallest defects' size (defectforge.detector.resolution; params.yaml's default); the values used are in details.json
    size: int = Field(128, ge=8, le=1024)       # short side after resizing (aspect ratio kept) when scale is null
    scale: Annotated[float, Field(gt=0, le=4)] | Literal["auto"] | None = None  # resize every image by this factor instead
    patch: Annotated[int, Field(ge=8, le=1024)] | Literal["auto"] | None = None  # training crops of patch x patch px (null: size)
    base_channels: int = Field(16, ge=4, le=128)
    depth: int = Field(4, ge=2, le=6)
    norm: Literal["group", "batch", "auto"] = "group"  # batch: the same per-channel affine on patches and whole images at eval
    score_pool: Annotated[int, Field(ge=1, le=63)] | Literal["auto"] = 9  # image score: max of the pool x pool averaged map
    synthetic: Literal["qc_pass", "all"] = "qc_pass"
    max_train_good: int | None = Field(None, ge=1)  # one fixed subset of defect-free training images (same for every run and seed)
    workers: int = Field(1, ge=1, le=64)         # processes training (run, seed) pairs side by side (same numbers as 1)

    @model_validator(mode="after")
    def _patch_fits_depth(self) -> "DetectorParams":
        patch = self.size if self.patch in (None, "auto") else self.patch  # auto resolves to size or null
        if patch % 2 ** (self.depth - 1):
            raise ValueError(f"patch (or size when patch is null) {patch} must be divisible by 2**(depth-1) = {2 ** (self.depth - 1)}")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v


class ReleaseParams(_Section):
    name: str = Field("sample", pattern=r"^[a-z0-9][a-z0-9_-]*$")


class Params(_Section):
    sample: SampleParams = SampleParams()
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    generate: GenerateParams = GenerateParams()
    refine: RefineParams = RefineParams()
    quality: QualityParams = QualityParams()
    detector: DetectorParams = DetectorParams()
    release: ReleaseParams = ReleaseParams()


MAX_MESSAGE = 500  # characters of a params error line (a value is cut to 80)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Got:
    """Shows a (possibly huge) offending value as its shortened repr."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return _short(self.value)


def _cap(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _describe(err: dict[str, Any], prefix: str = "") -> str:
    key = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
    kind = err["type"]
    got = _Got(err.get("input"))
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "literal_error":
        return f"{key}: got {got!r}; allowed: {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}: {got!r} is out of range ({err['msg'].lower()})"
    if kind == "value_error":
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    if kind in ("int_type", "bool_type", "float_type", "string_type", "list_type", "tuple_type", "dict_type"):
        return f"{key}: {err['msg'].lower()}, got {type(got.value).__name__} {got!r} (params are strictly typed)"
    return f"{key}: {err['msg']} (got {got!r})"


def parse_params(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    try:
        params = Params.model_validate(data or {})
    except ValidationError as exc:
        errors = exc.errors()
        msg = "; ".join(_describe(e) for e in errors[:5])
        if len(errors) > 5:
            msg += f"; and {len(errors) - 5} more"
        raise ParamsError(_cap(f"{source}: {msg}")) from None
    if params.split.scheme == "kfold" and params.split.fold >= params.split.k:
        raise ParamsError(f"{source}: split.fold: {params.split.fold} must be < split.k ({params.split.k})")
    from defectforge.metrics.gates import GateThresholds, SetThresholds, thresholds_from_dict

    for key, cls in (("gates", GateThresholds), ("set_gates", SetThresholds)):
        try:
            thresholds_from_dict(getattr(params.quality, key), cls)
        except ParamsError as exc:
            raise ParamsError(f"{source}: quality.{key}: {exc}") from None
    if params.pretrain.profile == "pretrained" and not params.pretrain.base:
        raise ParamsError(f"{source}: pretrain.base: the pretrained profile needs a diffusers model directory or hub id")
    return params


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``) and duplicate keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, f"alias *{event.anchor} is not allowed in a params file (write the value out)", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.MarkedYAMLError(
                    None, None,
                    f"duplicate key {_short(key, 40)} (first on line {seen[key].line + 1})", key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_params_yaml(path: str | Path) -> Any:
    """The parsed params file (UTF-8, no aliases, no duplicate keys); ParamsError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror or exc.__class__.__name__})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ParamsError(_cap(f"{path}: not valid YAML ({_yaml_problem(exc)})")) from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML (nested too deeply)") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; ParamsError names the file and the key."""
    path = Path(path)
    data = read_params_yaml(path)
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return parse_params(data, str(path))
