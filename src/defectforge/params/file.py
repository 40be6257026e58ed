"""The whole params file as one model: every stage's section, for ``defectforge check``,
the flows and the tests. A stage script loads only its own sections
(:func:`defectforge.params.loader.load_section`) and never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from defectforge.errors import ParamsError
from defectforge.params.data import DataParams
from defectforge.params.detector import DetectorParams
from defectforge.params.finetune import FinetuneParams
from defectforge.params.generate import GenerateParams
from defectforge.params.loader import SECTIONS, Section, cap, read_mapping, validation_message
from defectforge.params.pretrain import PretrainParams
from defectforge.params.quality import QualityParams
from defectforge.params.refine import RefineParams
from defectforge.params.release import ReleaseParams
from defectforge.params.sample import SampleParams
from defectforge.params.split import SplitParams


class Params(Section):
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


assert tuple(Params.model_fields) == SECTIONS, "loader.SECTIONS must name Params' sections, in order"
# the sections' own checks, in the order their problems are reported (the first one stops the file)
_CHECK_ORDER = ("split", "quality", "pretrain") + tuple(s for s in SECTIONS if s not in ("split", "quality", "pretrain"))


def parse_params(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a parsed params file; ParamsError names the source and the dotted key."""
    try:
        params = Params.model_validate(data or {})
    except ValidationError as exc:
        raise ParamsError(cap(f"{source}: {validation_message(exc)}")) from None
    for key in _CHECK_ORDER:
        problem = getattr(params, key).check(key)
        if problem:
            raise ParamsError(f"{source}: {problem}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a whole params file; ParamsError names the file and the key."""
    path = Path(path)
    return parse_params(read_mapping(path), str(path))
