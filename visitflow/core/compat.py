"""What the two compat modules share: which version is installed, is it a tested one, and
look a dotted name up in a module.

``visitflow/worker/prefect_compat.py`` (private Prefect names, in the worker) and
``visitflow/tiled/tiled_compat.py`` (Tiled's server internals, in Tiled's process) each list
the names they need and check them at import; this is the lookup both do, kept in core so
that each process imports only its own list.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["installed", "is_tested", "lookup"]


def installed(distribution: str) -> str:
    """The installed version of ``distribution`` (``importlib.metadata``)."""
    from importlib.metadata import version

    return version(distribution)


def is_tested(version: str, tested: str) -> bool:
    """Whether ``version`` lies in the ``tested`` specifier set (pre-releases included)."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(tested).contains(version, prereleases=True)


def lookup(module: str, dotted: str) -> Any:
    """``module.dotted`` (attributes of attributes); ImportError/AttributeError if missing."""
    obj: Any = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
