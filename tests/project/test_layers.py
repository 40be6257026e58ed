"""The package's layers: a module imports only from its own layer or from a lower one, so there
is no import cycle between layers, and the shared core never reaches up into a method, a stage
or the publishing side.

Layers, lowest first. ``params`` is two things: each stage's params model and the loader, which
every layer may read, and the composition of the whole file (``params.generate`` builds the
generate section from the method registry; ``params.quality`` checks gate names against the
metrics), which sits above the methods.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from defectforge import code

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "defectforge"

LAYERS = [
    {"errors", "seeding", "code"},
    {"params"},
    {"data"},
    {"manifest"},
    {"masks"},
    {"metrics"},
    {"diffusion"},
    {"methods"},
    {"params.generate", "params.quality", "params.file", "params.write_needs"},
    {"detector"},
    {"publish"},
    {"pipeline"},
    {"orchestrate", "doctor", "params_doc", "cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def level(module: str) -> int | None:
    """The layer of ``defectforge.<module>``: its longest prefix named in LAYERS."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LEVEL:
            return LEVEL[".".join(parts[:k])]
    return None


def _module(f: Path, pkg: Path = PKG) -> str:
    rel = f.relative_to(pkg).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _edges(pkg: Path = PKG) -> list[tuple[str, str, str]]:
    """(importing file, its module, imported module) for every defectforge import, both without the
    ``defectforge.`` prefix; a package's own parents are left out (importing a.b imports a)."""
    out = []
    for f in sorted(pkg.rglob("*.py")):
        if f == pkg / "__init__.py":
            continue  # the top-level accessors import the consumer side lazily
        src = _module(f, pkg)
        for name in code.imports(f, pkg.parent):
            target = name.removeprefix("defectforge").lstrip(".")
            if target and not src.startswith(target + ".") and target != src:
                out.append((f.relative_to(pkg.parent).as_posix(), src, target))
    return out


def _upward(edges) -> list[str]:
    return sorted({f"{f} imports {t}" for f, s, t in edges
                   if level(s) is not None and level(t) is not None and level(t) > level(s)})


def test_every_module_has_a_layer():
    missing = sorted({_module(f) for f in PKG.rglob("*.py") if f != PKG / "__init__.py" and level(_module(f)) is None})
    assert missing == [], "give each new package a layer in LAYERS"


def test_imports_only_go_down():
    up = _upward(_edges())
    assert up == [], "imports from a higher layer:\n" + "\n".join(up)


@pytest.mark.parametrize("low,high", [("diffusion", "methods"), ("masks", "diffusion"), ("publish", "pipeline"),
                                      ("methods", "params.generate")])
def test_the_check_sees_an_upward_import(low, high, tmp_path):
    """A planted upward import, in a copy of the package, is caught (the test above can fail)."""
    pkg = tmp_path / "defectforge"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert _upward(_edges(pkg)) == []
    (pkg / low / "_planted_upward_import.py").write_text(f"import defectforge.{high}\n")
    assert [line for line in _upward(_edges(pkg)) if "_planted_upward_import.py" in line]
