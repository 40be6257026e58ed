"""The ``release`` section: the released dataset's name (read by the release stage)."""

from __future__ import annotations

from pydantic import Field

from defectforge.params.loader import Section


class ReleaseParams(Section):
    # The default names the built-in sample; the release stage says how to rename it when the data is a team's own.
    # 64 characters: it becomes a folder, a git tag (dataset/<name>/v<n>) and part of every version string.
    name: str = Field("sample", pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)
