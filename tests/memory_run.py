"""The in-memory run and sink now live in the public :mod:`visitflow.flow.testing`; kept here so
existing test imports keep working."""

from visitflow.flow.testing import MemoryRun, MemorySink

__all__ = ["MemoryRun", "MemorySink"]
