"""The ``data`` section: where the real images are and how they are laid out (read by ingest)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from defectforge.errors import ParamsError
from defectforge.params.loader import Section


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


class DataParams(Section):
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
