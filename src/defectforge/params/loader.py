"""Reading params.yaml, and the one-line errors every params model raises.

Unknown keys, wrong types and out-of-range values stop the stage with one line that
names the dotted key and what is allowed::

    params.yaml: split.scheme: got 'thirds'; allowed: 'third' or 'kfold'

Types are strict (pydantic strict mode): ``"3"`` is not an integer, ``true`` is not a
count, ``"off"`` is not a boolean; an integer is accepted where a float is expected
(``lr: 1``), a YAML list where a pair is (``scale_range: [0.8, 1.2]``). ``dvc exp run -S
key=value`` writes its value into params.yaml typed by YAML, so ``-S generate.seed=3``
arrives as an integer. The params file itself must be UTF-8 YAML without duplicate keys
and without aliases (``*name``: an alias "bomb" expands to gigabytes).

A stage reads only its own sections (``load_section(path, "split", SplitParams)``), and
dvc.yaml lists only those keys, so changing a knob reruns only the stages that use it.
"""

from __future__ import annotations

import copy

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from defectforge.errors import ParamsError

# The top-level sections of a params file (each one's model lives in defectforge.params.<name>)
SECTIONS = ("sample", "data", "split", "pretrain", "finetune", "generate", "refine", "quality", "detector", "release")
MAX_MESSAGE = 500  # characters of a params error line (a value is cut to 80)


class Section(BaseModel):
    """A section of params.yaml: strict, frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def check(self, key: str) -> str | None:  # noqa: ARG002
        """A problem pydantic cannot word (the whole line after ``<file>: ``), or None."""
        return None


S = TypeVar("S", bound=Section)


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Got:
    """Shows a (possibly huge) offending value as its shortened repr."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return short(self.value)


def cap(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def describe(err: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as ``<dotted key>: <what is wrong>``."""
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


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """The first five errors of ``exc``, then how many more."""
    errors = exc.errors()
    msg = "; ".join(describe(e, prefix) for e in errors[:5])
    if len(errors) > 5:
        msg += f"; and {len(errors) - 5} more"
    return msg


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
                    f"duplicate key {short(key, 40)} (first on line {seen[key].line + 1})", key_node.start_mark,
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
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, not a params file")
    if path.exists() and not path.is_file():
        raise ParamsError(f"{path}: not a regular file (a params file is a YAML file)")
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
        raise ParamsError(cap(f"{path}: not valid YAML ({_yaml_problem(exc)})")) from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML (nested too deeply)") from None


def override(data: dict[str, Any] | None, assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` set, as ``dvc exp run -S`` does: a dotted key (a leading ``+``,
    DVC's mark for a new key, is accepted), the value read as YAML (``3``, ``true``, ``[a, b]``,
    ``{crack: generated}``). ParamsError names the assignment that cannot apply."""
    out = copy.deepcopy(data) if data else {}
    for a in assignments:
        key, eq, raw = a.partition("=")
        key = key.strip().lstrip("+")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ParamsError(f"-S {short(a)}: expected KEY=VALUE with a dotted key, e.g. -S generate.n_per_defect=8")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise ParamsError(cap(f"-S {short(a)}: value is not valid YAML ({_yaml_problem(exc)})")) from None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"-S {short(a)}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def read_mapping(path: str | Path) -> dict[str, Any] | None:
    """The params file's top level: a mapping of sections (None: an empty file)."""
    data = read_params_yaml(path)
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def read_sections(path: str | Path) -> dict[str, Any]:
    """The params file's sections; an unknown section stops it (as it stops the whole file's model)."""
    data = read_mapping(path) or {}
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ParamsError(cap(f"{path}: " + "; ".join(f"{k}: unknown key" for k in unknown[:5])))
    return data


def parse_section(data: Any, key: str, model: type[S], source: str = "params.yaml") -> S:
    """Section ``key`` of a parsed params file as ``model``; ParamsError names the file and the dotted key."""
    try:
        section = model.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(cap(f"{source}: {validation_message(exc, key)}")) from None
    problem = section.check(key)
    if problem:
        raise ParamsError(f"{source}: {problem}")
    return section


def load_section(path: str | Path, key: str, model: type[S]) -> S:
    """Read one section of a params file (the stage scripts' loader): only ``model``'s code runs."""
    return parse_section(read_sections(path).get(key, {}), key, model, str(path))
