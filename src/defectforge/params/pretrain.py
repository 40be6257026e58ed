"""The ``pretrain`` section: the base model (read by the pretrain stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectforge.params.loader import Section


class PretrainParams(Section):
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

    def check(self, key: str) -> str | None:
        if self.profile == "pretrained" and not self.base:
            return f"{key}.base: the pretrained profile needs a diffusers model directory or hub id"
        return None
