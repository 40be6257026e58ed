"""Write ``docs/params.md``, the params.yaml reference, from the params models themselves.

    python -m defectforge.params_doc            # writes docs/params.md
    python -m defectforge.params_doc --check    # exit 1 when docs/params.md differs from what it would write

One table per section (nested sections, such as ``quality.gates`` or ``generate.inversion``,
get their own): key, type, default, bounds and the description. A description is the field's
``description=`` when it has one, else the comment on the line of its declaration or the
comment lines right above it, so the reference says what the code says and cannot go stale
(tests/params/test_params_doc.py compares the committed file with a fresh one).
"""

from __future__ import annotations

import argparse
import json
import inspect
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

OUT = Path(__file__).resolve().parents[2] / "docs" / "params.md"
_FIELD = re.compile(r"^(\s+)([A-Za-z_]\w*)\s*:(?!=)")
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length", "max_length": "max length"}


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment beside or right above its declaration in ``cls``'s own source."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and len(m.group(1)) == 4 and m.group(2) in cls.__dict__.get("__annotations__", {}):
            code, _, trailing = _split_comment(line)
            parts = above + ([trailing] if trailing else [])
            if parts:
                out[m.group(2)] = " ".join(parts)
        above = []
    return out


def _split_comment(line: str) -> tuple[str, str, str]:
    """``code  # comment`` split at the first ``#`` outside a string literal."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i], "#", line[i + 1 :].strip()
    return line, "", ""


def _description(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    if info.description:
        return info.description
    for klass in model.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return _comments(klass).get(name, "")
    return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(info) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    text = json.dumps(value) if isinstance(value, str) else str(value).replace("'", '"')
    return f"`{text}`"


def _bounds(info) -> str:
    out = []
    for meta in info.metadata:
        for attr, word in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return ", ".join(out)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _section(model: type[BaseModel], key: str, out: list[str]) -> None:
    doc = inspect.cleandoc(model.__doc__ or "")
    out += [f"## `{key}`", ""]
    if doc and not doc.startswith(("A section of params.yaml", "Usage docs:")):
        out += [doc, ""]
    rows, nested = [], []
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            nested.append((name, info.annotation))
            anchor = f"{key}{name}".lower()  # GitHub's anchor of the heading `key.name`: dots and backticks dropped
            rows.append(f"| `{name}` | section | | | see [`{key}.{name}`](#{anchor}) |")
            continue
        desc = _description(model, name).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {_bounds(info)} | {desc} |")
    out += ["| key | type | default | bounds | description |", "| --- | --- | --- | --- | --- |", *rows, ""]
    for name, sub in nested:
        _section(sub, f"{key}.{name}", out)


def render() -> str:
    """The whole reference as Markdown."""
    from defectforge.params.file import Params

    out = [
        "# params.yaml reference",
        "",
        "<!-- written by `python -m defectforge.params_doc` from the params models; do not edit by hand -->",
        "",
        "Every key of `params.yaml`, its type, default and bounds. The file is validated on read: an",
        "unknown key, a wrong type or a value out of bounds stops the stage with one line naming the",
        "key. Each method's section (`generate.<method>`) comes from the method registry.",
        "",
    ]
    for name, info in Params.model_fields.items():
        _section(info.annotation, name, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not a.out.is_file() or a.out.read_text() != text:
            print(f"{a.out} is stale: run python -m defectforge.params_doc", file=sys.stderr)
            return 1
        return 0
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
