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

__all__ = ["installed", "is_tested", "lookup", "resolve_all"]


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


def resolve_all(entries, resolve) -> tuple[dict[str, Any], list[str]]:
    """``resolve`` every entry (a ``LookupError`` says what is wrong with it): the resolved
    objects by ``qualname``, and one line per failure with why the entry is needed, so the
    caller can raise a single error naming every broken name at once."""
    resolved, problems = {}, []
    for entry in entries:
        try:
            resolved[entry.qualname] = resolve(entry)
        except LookupError as exc:
            problems.append(f"  {exc} — needed because it {entry.why}")
    return resolved, problems
