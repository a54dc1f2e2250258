"""Public: check an analysis without servers (post, live in random batches, resume).

``assert_check(my_analysis)`` in an analyst's test; ``MemoryRun``/``MemorySink`` to drive the
engine by hand.  The implementation is :mod:`visitflow.flow.testing`; this module is the
stable import path.
"""

from .flow.testing import (
    CheckReport,
    MemoryRun,
    MemorySink,
    assert_check,
    check,
    load_analyses,
    load_recorded,
    spec_of,
    synthetic_data,
)

__all__ = ["CheckReport", "MemoryRun", "MemorySink", "assert_check", "check", "load_analyses", "load_recorded",
           "spec_of", "synthetic_data"]
