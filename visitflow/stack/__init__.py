"""Running the local stack (dev IdP, Tiled, Prefect server and worker): used by
``visitflow up``/``down``/``demo`` and by the test fixtures, so both start things the same way."""

__all__ = []
