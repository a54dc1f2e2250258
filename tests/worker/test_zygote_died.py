"""The warm worker's zygote dying: :class:`visitflow.errors.ZygoteDied`, raised by the real
parent side (:class:`visitflow.worker.parent.Zygote`) around a real zygote process.

Why: the worker restarts a dead zygote before each run (``VisitflowWorker._ensure_zygote``),
so what must hold is that every way of losing it -- killed while idle, killed while a fork is
being asked for, dead during its preload -- is a ``ZygoteDied`` the worker can act on, never
a hang or a ``KeyError``.  (No Prefect server: the zygote is only a process and a pipe.)
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from visitflow.errors import ServiceError, ZygoteDied
from visitflow.worker.parent import Zygote


def test_a_killed_zygote_fails_the_pending_fork_and_every_later_one(zygote):
    assert zygote.alive() and zygote.import_seconds is not None
    # Stopped, it reads no request: the fork below is certainly in flight when it dies.
    os.kill(zygote.proc.pid, signal.SIGSTOP)
    raised: list[BaseException] = []

    def ask():
        try:
            zygote.fork("00000000-0000-0000-0000-000000000000", {}, None, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    # The request is written under the lock before the wait; the pending entry is how the
    # test knows the fork is waiting (no sleep).
    while asker.is_alive() and not zygote._started:
        asker.join(0.05)
    assert asker.is_alive() and zygote._started, raised
    os.kill(zygote.proc.pid, signal.SIGKILL)
    asker.join(60)
    assert not asker.is_alive(), "the pending fork must be released when the zygote dies"
    (exc,) = raised
    assert isinstance(exc, ZygoteDied) and isinstance(exc, ServiceError), repr(exc)
    assert exc.code == "zygote_died" and str(exc) == "zygote exited"

    zygote.proc.wait(30)
    assert not zygote.alive()
    with pytest.raises(ZygoteDied, match="the zygote is not running"):
        zygote.fork("00000000-0000-0000-0000-000000000001", {}, None)


def test_a_zygote_that_dies_during_preload_is_zygote_died(tmp_path, monkeypatch):
    """A preloaded module that starts a thread makes the zygote refuse to fork (exit 3)."""
    (tmp_path / "starts_a_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    z = Zygote(["starts_a_thread"])
    with pytest.raises(ZygoteDied, match=r"^zygote exited with 3 during preload$"):
        z.start(timeout=300)
    assert not z.alive()
