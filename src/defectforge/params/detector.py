"""The ``detector`` section: the detector trained real-only and real+synthetic (read by the detector stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from defectforge.params.loader import Section

class DetectorParams(Section):
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
