"""dvc.yaml's code deps cannot go stale: every defectforge module a stage runs is a dep.

For each stage, start from its entry point (the script in its ``cmd``), follow every
``import`` / ``from ... import`` anywhere in the module (lazy imports inside functions
run too) and every string naming a ``defectforge.*`` module (the method registry loads
its modules by name), transitively; every file found must lie under one of the
stage's ``deps``. Editing any of them then reruns the stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


# The one exception, reviewed: the top-level package's convenience accessors
# (``defectforge.load`` / ``ManifestDataset``) import the consumer side lazily, and no
# stage calls them (test_no_stage_module_uses_the_consumer_accessors keeps it so).
TOP = SRC / "defectforge" / "__init__.py"


def _imports(path: Path) -> set[str]:
    """Every defectforge module ``path`` can import (with the parent packages of each)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    nodes = list(ast.walk(tree)) if path != TOP else list(ast.iter_child_nodes(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("defectforge."):
            names.add(node.value)
    out = set()
    for n in names:
        if n == "defectforge" or n.startswith("defectforge."):
            parts = n.split(".")
            out |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return {n for n in out if _module_file(n) is not None}


def closure(entry: Path) -> set[Path]:
    """The files of every defectforge module reachable from ``entry``."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [_module_file(n) for n in _imports(f)]
    return {f for f in seen if SRC in f.parents}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    spec = _stages()[stage]
    script = ROOT / spec["cmd"].split()[1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    assert _covered(script, deps), f"{stage}: its own script {script.name} is not a dep"
    missing = sorted(f.relative_to(ROOT).as_posix() for f in closure(script) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs these modules but does not list them as deps: {missing}"


def test_the_check_sees_lazy_and_registry_imports():
    """The closure must follow imports inside functions and the registry's module names."""
    files = {f.relative_to(SRC).as_posix() for f in closure(ROOT / "stages" / "generate.py")}
    assert "defectforge/methods/inversion.py" in files  # by name, from the registry
    assert "defectforge/pipeline/fanout.py" in files     # lazy, inside generate.run
    assert "defectforge/metrics/detection.py" in closure_names("detector")


def closure_names(stage: str) -> set[str]:
    script = ROOT / _stages()[stage]["cmd"].split()[1]
    return {f.relative_to(SRC).as_posix() for f in closure(script)}


def test_no_stage_module_uses_the_consumer_accessors():
    for f in {f for st in _stages() for f in closure(ROOT / _stages()[st]["cmd"].split()[1])} - {TOP}:
        text = f.read_text()
        assert "defectforge.load(" not in text and "defectforge.ManifestDataset" not in text, f
