"""Generation methods: the registry (here) and one place per method.

================  ================================================  ===================================================
id                class                                             paper
================  ================================================  ===================================================
copy-paste        :class:`defectforge.methods.copy_paste.CopyPaste`  the baseline of every paper's tables
cutpaste          :class:`defectforge.methods.cutpaste.CutPaste`     CutPaste (Li et al. 2021), patch and scar
perlin            :class:`defectforge.methods.perlin.Perlin`         DRAEM's Perlin-noise anomalies
inversion         :class:`defectforge.methods.inversion.Inversion`   DDIM inversion + disentangled sampling
blended           :class:`defectforge.methods.blended.Blended`       AdaBLDM (blended latent diffusion)
defectdiffu       :mod:`defectforge.methods.defectdiffu` (package)   DefectDiffu (double-free guidance, TDIA, mask module)
anomalydiffusion  :mod:`defectforge.methods.anomalydiffusion` (pkg)  AnomalyDiffusion (spatial anomaly embedding, Eq. 7-9)
================  ================================================  ===================================================

A method is one registry line, ``id: (module, class name)``; :func:`register` adds one at
run time (a test's own method, a plugin). Modules load on first use, so the registry (and
the manifest suite that checks method ids) stays cheap to import; a method that needs
torch pulls it in only when asked for. The ids are what params.yaml and the manifest say.

:func:`code_sha256` is the code part of a sample's identity: the files of the method's own
module (or package) and what it imports, not the other methods'. This file is not in it:
which methods exist does not change what one of them makes.
"""

from __future__ import annotations

import hashlib
import importlib
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from defectforge.methods.base import DiffusionMethod, GenerationMethod, GenerationResult
from defectforge.methods.config import MethodConfig


class Entry(NamedTuple):
    """Where a method's class lives: the module to import and the class's name in it."""

    module: str
    cls: str


METHODS: dict[str, Entry] = {
    "copy-paste": Entry("defectforge.methods.copy_paste", "CopyPaste"),
    "cutpaste": Entry("defectforge.methods.cutpaste", "CutPaste"),
    "perlin": Entry("defectforge.methods.perlin", "Perlin"),
    "inversion": Entry("defectforge.methods.inversion", "Inversion"),
    "blended": Entry("defectforge.methods.blended", "Blended"),
    "defectdiffu": Entry("defectforge.methods.defectdiffu.method", "DefectDiffu"),
    "anomalydiffusion": Entry("defectforge.methods.anomalydiffusion.method", "AnomalyDiffusion"),
}


def register(name: str, module: str, cls: str) -> None:
    """Add method ``name`` (its class ``cls`` in ``module``); refuses an id already taken."""
    if name in METHODS and METHODS[name] != (module, cls):
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].module}.{METHODS[name].cls})")
    METHODS[name] = Entry(module, cls)


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def _unknown(name: str):
    from defectforge.errors import ParamsError

    return ParamsError(f"generate.methods: unknown method {name!r}; allowed: {registered_methods()}")


def get_method_class(name: str) -> type[GenerationMethod]:
    """The class of method ``name`` (imports its module)."""
    if name not in METHODS:
        raise _unknown(name)
    entry = METHODS[name]
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    if not (isinstance(cls, type) and issubclass(cls, GenerationMethod)) or cls.name != name:
        raise TypeError(f"{entry.module}.{entry.cls} is not the GenerationMethod named {name!r}")
    return cls


def needs_checkpoints(name: str) -> bool:
    """Whether ``name`` needs the fine-tuned models (its class's ``needs_checkpoints``)."""
    return bool(get_method_class(name).needs_checkpoints)


def registered_methods() -> list[str]:
    return list(METHODS)


# ------------------------------------------------------------------ the code a method's samples depend on
def _imported(path: Path, src: Path) -> set[str]:
    """The defectforge modules ``path`` imports or names in a string (anywhere in it, as
    :func:`defectforge.code.imports` reads them), without their parent packages."""
    return set(_imported_text(path.read_text(), str(path), src))


@lru_cache(maxsize=4096)
def _imported_text(text: str, where: str, src: Path) -> frozenset[str]:
    import ast

    from defectforge.code import module_file

    names: set[str] = set()
    for node in ast.walk(ast.parse(text, where)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("defectforge."):
            names.add(node.value)  # a module loaded by its name
    return frozenset(n for n in names if n.startswith("defectforge.") and module_file(n, src) is not None)


def code_files(modules: list[str], src: Path | None = None) -> set[Path]:
    """The files of ``modules`` (dotted names) and of every defectforge module they import,
    transitively, with the ``__init__.py`` of each package on the way. A package file reached
    only as the parent of a submodule is included but its own imports are not followed (its
    re-exports do not change what the submodule computes), and this registry is neither
    followed nor included: its module names would pull in every method."""
    from defectforge.code import SRC, module_file

    src = SRC if src is None else src
    registry = module_file(__name__, src)
    todo = [module_file(m, src) for m in modules]
    if None in todo:
        raise ValueError(f"{modules}: not all are defectforge modules under {src}")
    followed: set[Path] = set()
    parents: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in followed or f == registry:
            continue
        followed.add(f)
        for name in _imported(f, src):
            todo.append(module_file(name, src))
            parts = name.split(".")
            parents |= {module_file(".".join(parts[:i]), src) for i in range(1, len(parts))}
    return {f for f in followed | parents if f is not None and src in f.parents} - {registry}


def code_sha256(name: str, stage: str | None = None, src: Path | None = None) -> str:
    """SHA-256 over the relative path and bytes of the files method ``name`` runs (its
    registered module's :func:`code_files`), plus those of the ``stage`` module that drives it
    (e.g. ``"defectforge.pipeline.generate"``), in path order: an edit to one method's files
    changes this for that method only."""
    from defectforge.code import SRC

    if name not in METHODS:
        raise _unknown(name)
    src = SRC if src is None else src
    files = code_files([METHODS[name].module] + ([stage] if stage else []), src)
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(src).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


__all__ = ["METHODS", "DiffusionMethod", "GenerationMethod", "GenerationResult", "MethodConfig", "Entry",
           "code_files", "code_sha256", "get_method_class", "needs_checkpoints", "register", "registered_methods", "unregister"]
