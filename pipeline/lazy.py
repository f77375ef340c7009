"""Lazy attributes of a stage package: ``from stages.student import distill_student`` imports the stage's
code (and torch) only then, while ``--help`` imports the package for its settings alone (PEP 562)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``where[name]`` on first use."""
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
