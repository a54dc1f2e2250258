"""The real zygote process both zygote suites drive (test_zygote_died, test_zygote_burst)."""

from __future__ import annotations

import os
import signal

import pytest

from visitflow.worker.parent import Zygote


@pytest.fixture
def zygote():
    """A started zygote (its preload takes seconds); killed and reaped afterwards."""
    z = Zygote()
    z.start(timeout=300)
    yield z
    if z.alive():
        os.kill(z.proc.pid, signal.SIGKILL)
    z.proc.wait(30)
