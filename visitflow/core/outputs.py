"""What an analysis may return — the one contract shared by the analyst's API
(:mod:`visitflow.flow.spec`), the engine (:mod:`visitflow.flow.engine`) and the result sinks.

A leaf module, so the engine can check outputs without importing the analyst's API (which
would make spec → flowrun → engine → spec a cycle).
"""

from __future__ import annotations

from typing import Any

from ..errors import AnalysisDefinitionError
from .scopes import valid_name

__all__ = ["check_outputs"]


def check_outputs(name: str, outputs: Any) -> dict:
    """Outputs are ``{name: array or scalar}`` with names usable as Tiled keys."""
    if not isinstance(outputs, dict) or not outputs:
        raise AnalysisDefinitionError(
            f"analysis {name} must return a non-empty dict of outputs, got {type(outputs).__name__}")
    for key in outputs:
        if not isinstance(key, str) or not valid_name(key):
            raise AnalysisDefinitionError(f"analysis {name}: output name {key!r} is not a valid Tiled key")
    return outputs
