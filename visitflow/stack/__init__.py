"""Running the local stack (dev IdP, Tiled, Prefect server and worker): used by
``visitflow up``/``down``/``demo`` and by the test fixtures, so both start things the same way.

Runs in an operator's or a test's process: it starts the other processes (:mod:`.services`
owns process groups and health polls; :mod:`.sim` the simulated scan of the demo).  Internal:
no stability promise."""

__all__ = []
