"""The defectforge code a stage runs: the files of every module reachable from an entry
module, and their content hash.

Reachable means: every ``import`` / ``from ... import`` anywhere in a module (imports
inside functions run too), and every string naming a ``defectforge.*`` module (the method
registry loads its modules by name), transitively, with the parent packages of each.
``tests/project/test_dvc_deps.py`` uses the same walk to check that dvc.yaml lists each stage's
modules as deps; :func:`code_sha256` of a stage's library module therefore changes only when
DVC also sees a changed dep of that stage.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SRC = PACKAGE.parent
# The top-level package's convenience accessors (``defectforge.load`` / ``ManifestDataset``)
# import the consumer side lazily and no stage calls them: only its module-level imports count.
TOP = PACKAGE / "__init__.py"


def module_file(name: str, src: Path = SRC) -> Path | None:
    """The source file of module ``name`` under ``src`` (a package's ``__init__.py``), or None."""
    base = src.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports(path: Path, src: Path = SRC) -> set[str]:
    """Every defectforge module ``path`` can import (with the parent packages of each)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    nodes = list(ast.walk(tree)) if path != src / "defectforge" / "__init__.py" else list(ast.iter_child_nodes(tree))
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
    return {n for n in out if module_file(n, src) is not None}


def closure(entry: Path, src: Path = SRC) -> set[Path]:
    """The files of every defectforge module reachable from the file ``entry``."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [module_file(n, src) for n in imports(f, src)]
    return {f for f in seen if src in f.parents}


@lru_cache(maxsize=None)
def code_sha256(module: str, src: Path = SRC) -> str:
    """SHA-256 over the relative path and bytes of every file :func:`closure` reaches from
    ``module`` (e.g. ``"defectforge.pipeline.generate"``), in path order (cached per process)."""
    entry = module_file(module, src)
    if entry is None:
        raise ValueError(f"{module}: not a defectforge module")
    h = hashlib.sha256()
    for f in sorted(closure(entry, src)):
        h.update(f.relative_to(src).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
