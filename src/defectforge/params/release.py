"""The ``release`` section: the released dataset's name (read by the release stage)."""

from __future__ import annotations

from pydantic import Field

from defectforge.params.loader import Section


class ReleaseParams(Section):
    name: str = Field("sample", pattern=r"^[a-z0-9][a-z0-9_-]*$")
