"""Lazy exports of a method package: its names importable from the package, each name's module
imported on first use, so importing one part of a paper does not import the others."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` for ``package`` and its ``__all__``: each name of ``modules[m]``
    is read from ``package.m`` when it is first asked for.

    >>> __getattr__, __all__ = lazy_exports(__name__, {"method": ("AnomalyDiffusion",)})  # doctest: +SKIP
    """
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
