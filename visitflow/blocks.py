"""Public: the credentials Block a flow run gets its Tiled access from.

``ScopedCredentials`` (Prefect block type ``visitflow-scoped-credentials``) holds where the
token service, Tiled and the ``visitflow`` client secret are; ``for_run(visit, run_id,
analysis)`` turns the run's delegation grant into refreshing Tiled clients.  ``save``
registers one under a name (``blocks/`` has a facility's).  The implementation is
:mod:`visitflow.flow.credentials`; this module is the stable import path, and the one Block
documents saved by earlier layouts were made from.
"""

from .flow.credentials import RunAccess, ScopedCredentials, save

__all__ = ["RunAccess", "ScopedCredentials", "save"]
