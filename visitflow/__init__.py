"""visitflow: a beamline scan starts its analysis with the user's delegated, narrowed authority.

Importing ``visitflow`` is cheap on purpose: the trigger runs inside blueapi and must not
pull in Prefect or Tiled's server stack.  The analyst's API (``visitflow.analysis``) is
loaded on first use.
"""

__all__ = ["analysis"]  # loaded on first use (below)

__version__ = "0.1.0"


def __getattr__(name):  # PEP 562: lazy import of the heavy analyst API
    if name == "analysis":
        from .spec import analysis

        return analysis
    raise AttributeError(f"module 'visitflow' has no attribute {name!r}")
