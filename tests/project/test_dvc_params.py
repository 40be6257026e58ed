"""dvc.yaml's ``params:`` cannot go stale: each stage lists exactly the params keys it reads.

Each stage script runs with ``load_section`` answering a recording proxy of the real
``params.yaml``'s section and its ``defectforge.pipeline`` modules replaced by stubs, so nothing is
computed. The proxy records every leaf the script reads (``p.generate.methods``); a
section handed to a pipeline function (``p.pretrain``) counts as read whole; a method
called on a section (``p.generate.model_needs()``) counts as reading every field its
source reads through ``self`` - found statically, following ``self.<method>()`` calls, so
a short-circuit (``a == x or b``) cannot hide a read whatever the values are.
``model_dump`` or ``getattr(self, ...)`` inside such a method reads the whole section.

A key read but not listed: editing it in params.yaml would not rerun the stage (the
stale-pretrain crash: pretrain skipped, finetune dying with ``KeyError: 'base'``). A key
listed but never read: a needless rerun.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
import types
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from defectforge.params.file import load_params
from defectforge.params.loader import parse_section, read_sections

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _listed(spec: dict) -> list[str]:
    """The stage's params keys in params.yaml (plain entries, or under ``params.yaml:``)."""
    out: list[str] = []
    for entry in spec.get("params") or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out += [k for k in entry.get("params.yaml") or []]
    return out


def _method_of(cls: type, name: str):
    for klass in cls.__mro__:
        fn = klass.__dict__.get(name)
        if isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        if inspect.isfunction(fn):
            return fn
    return None


def _self_reads(cls: type, name: str, seen: set[str] | None = None) -> set[str]:
    """The fields of ``cls`` that method ``name`` reads through ``self`` ("" = the whole section)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    fn = _method_of(cls, name)
    if fn is None:
        return set()
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    reads: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "self":
            reads.add("")  # a field chosen at run time: the whole section
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            attr = node.attr
            if attr in cls.model_fields:
                reads.add(attr)
            elif attr.startswith("model_dump"):
                reads.add("")
            elif _method_of(cls, attr) is not None:
                reads |= _self_reads(cls, attr, seen)
    return reads


class Recorder:
    def __init__(self):
        self.reads: set[str] = set()


class Proxy:
    """A params object that records what is read from it."""

    def __init__(self, obj: BaseModel, path: str, rec: Recorder):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_rec", rec)

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path and name else (self._path or name)

    def __getattr__(self, name: str):
        obj, rec = self._obj, self._rec
        value = getattr(obj, name)
        if _method_of(type(obj), name) is not None and not isinstance(value, BaseModel):
            rec.reads |= {self._key(field) for field in _self_reads(type(obj), name)}
            return value
        if isinstance(value, BaseModel):
            return Proxy(value, self._key(name), rec)
        rec.reads.add(self._key(name))
        return value


class PipelineStub(types.SimpleNamespace):
    """A ``defectforge.pipeline.<stage>`` module whose functions read what they are given, whole."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self._rec = rec

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, Proxy):
                    self._rec.reads.add(a._path)

        return call


def stage_reads(stage: str, params_file: Path = ROOT / "params.yaml") -> set[str]:
    """The params keys the stage's script reads (a section path = the whole section)."""
    script = ROOT / _stages()[stage]["cmd"].split()[1]
    spec = importlib.util.spec_from_file_location(f"_stage_{stage}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = Recorder()
    load_params(params_file)  # the whole file is valid
    sections = read_sections(params_file)
    assert hasattr(mod, "load_section"), f"{script}: does not load its sections with load_section"
    mod.load_section = lambda _path, key, model: Proxy(parse_section(sections.get(key, {}), key, model), key, rec)
    stubbed = 0
    for name, value in list(vars(mod).items()):
        if isinstance(value, types.ModuleType) and value.__name__.startswith("defectforge.pipeline.") \
                and value.__name__ != "defectforge.pipeline.entry":
            setattr(mod, name, PipelineStub(rec))
            stubbed += 1
    assert stubbed, f"{script}: no defectforge.pipeline module to stub; the check would run the stage"
    fn = mod.main.__wrapped__  # the function under @stage, without its exit handling
    fn(*[f"arg{i}" for i in range(len(inspect.signature(fn).parameters))])
    assert rec.reads, f"{stage}: the script read no params at all (does it still call load_section?)"
    return rec.reads


def _covered(key: str, listed: list[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in listed)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_each_stage_lists_exactly_the_params_it_reads(stage):
    listed = _listed(_stages()[stage])
    reads = stage_reads(stage)
    missing = sorted(k for k in reads if not _covered(k, listed))
    assert not missing, f"dvc.yaml stage {stage!r} reads these params but does not list them under params: {missing}"
    unread = sorted(entry for entry in listed if not any(r == entry or r.startswith(entry + ".") or entry.startswith(r + ".") for r in reads))
    assert not unread, f"dvc.yaml stage {stage!r} lists params it never reads: {unread}"


def test_the_check_sees_reads_inside_params_methods_whatever_the_values():
    """pretrain and finetune call p.generate.model_needs(): every field it can read counts,
    also the one a short-circuit skips with params.yaml's values."""
    for stage in ("pretrain", "finetune"):
        assert stage_reads(stage) == {stage, "generate.methods", "generate.target_placement", "generate.target_placement_by_type"}
    assert _self_reads(type(load_params(ROOT / "params.yaml").generate), "method_sha256") >= {""}  # model_dump: whole section
    assert not _covered("generate.target_placement", ["generate.methods"]) and _covered("generate.target_placement", ["generate"])
