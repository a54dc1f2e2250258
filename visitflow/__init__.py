"""visitflow: a beamline scan starts its analysis with the user's delegated, narrowed authority.

The public API is small and pinned (``tests/test_public_api.py``):

- ``visitflow.analysis`` — ``@analysis(reads=[...])``, the analyst's whole job;
- ``visitflow.read_result`` — an analysis' outputs, read back from its Tiled node;
- ``visitflow.options`` (``Options``), ``visitflow.testing`` (``assert_check``, ...),
  ``visitflow.blocks`` (the ``ScopedCredentials`` Block), ``visitflow.trigger`` (blueapi's
  side: ``AnalysisTrigger``, ``uses_analyses``) and ``visitflow.errors`` (every exception).

Everything else — ``core/``, ``flow/``, ``tiled/``, ``token_service/``, ``worker/``,
``stack/``, ``production/`` — is internal: folders named for the process their code runs in
(docs/architecture.md), free to change between releases.

Importing ``visitflow`` is cheap on purpose: the trigger runs inside blueapi and must not
pull in Prefect or Tiled's server stack.  ``analysis`` and ``read_result`` are loaded on
first use.
"""

__all__ = ["analysis", "read_result"]  # loaded on first use (below)

__version__ = "0.1.0"


def __getattr__(name):  # PEP 562: lazy import of the heavy analyst API
    if name == "analysis":
        from .flow.builder import analysis

        return analysis
    if name == "read_result":
        from .flow.sink import read_result

        return read_result
    raise AttributeError(f"module 'visitflow' has no attribute {name!r}")
