"""Public: typed analysis options (``class SaxsOptions(Options): ...``), set per plan.

An analysis declares ``@analysis(reads=[...], options=SaxsOptions)``; each field is a
keyword argument of the function, a flow parameter, and may be set by a plan through
``uses_analyses(...)``.  The implementation is :mod:`visitflow.core.options` (light: the
trigger checks plan options inside blueapi with it); this module is the stable import path.
"""

from .core.options import Options

__all__ = ["Options"]
