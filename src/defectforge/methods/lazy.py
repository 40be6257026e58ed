"""Lazy exports of a method package: its names importable from the package, each name's module
imported on first use, so importing one part of a paper does not import the others."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` is read from ``package.<exports[name]>``.

    >>> __getattr__ = lazy_exports(__name__, {"AnomalyDiffusion": "method"})  # doctest: +SKIP
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
