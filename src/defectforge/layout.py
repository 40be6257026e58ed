"""Where each stage's outputs live, relative to a work directory.

dvc.yaml spells the same paths (a test keeps the two in step); the Prefect flow uses
this class so it writes exactly what ``dvc repro`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    workdir: Path = Path(".")

    @property
    def sample(self) -> Path:
        return self.workdir / "data/sample"

    @property
    def source(self) -> Path:
        return self.workdir / "data/manifests/source.parquet"

    @property
    def split(self) -> Path:
        return self.workdir / "data/manifests/split.parquet"

    @property
    def generated(self) -> Path:
        return self.workdir / "data/generated"

    @property
    def release(self) -> Path:
        return self.workdir / "data/release"

    def outs(self) -> dict[str, Path]:
        return {"sample": self.sample, "ingest": self.source, "split": self.split, "generate": self.generated, "release": self.release}
