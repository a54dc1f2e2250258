"""A burst of fork requests reaches the real zygote in one read and every one is answered.

Why: the zygote used to ``select()`` on stdin and then ``sys.stdin.readline()``.  When the
worker wrote several requests before the zygote looked (three concurrent post runs in
tests/flow/test_concurrent_post.py, under CI load), the first readline pulled all of them
into Python's buffer and returned one; select() then saw an empty pipe and the others were
never answered ("no answer from the zygote" after 30 s: a Crashed flow run).  Here the
zygote is stopped while three requests are written, so they are certainly in the pipe
together when it resumes.  (No Prefect server: the children fail fast against a closed port
and are killed; only the zygote's answers are under test.)
"""

from __future__ import annotations

import os
import signal
import threading


#: a child's environment: an API on a closed port, no retries, so a child exits at once
CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PREFECT_API_URL": "http://127.0.0.1:9/api",
             "PREFECT_CLIENT_MAX_RETRIES": "0", "HOME": os.environ.get("HOME", "/tmp")}


def test_requests_written_together_are_all_answered(zygote):
    os.kill(zygote.proc.pid, signal.SIGSTOP)   # nothing is read until all three are written
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        try:
            results[i] = zygote.fork(f"00000000-0000-0000-0000-00000000000{i}", CHILD_ENV, None, timeout=60)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    askers = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(3)]
    for t in askers:
        t.start()
    while len(zygote._started) < 3 and any(t.is_alive() for t in askers):
        askers[0].join(0.05)
    assert len(zygote._started) == 3, results   # all three requests are in the pipe
    os.kill(zygote.proc.pid, signal.SIGCONT)
    for t in askers:
        t.join(90)
    pids = [getattr(results.get(i), "pid", None) for i in range(3)]
    try:
        assert all(isinstance(p, int) and p > 0 for p in pids), results
        assert len(set(pids)) == 3, pids
    finally:
        for pid in pids:
            if isinstance(pid, int):
                try:
                    os.killpg(pid, signal.SIGKILL)   # each child leads its own session
                except ProcessLookupError:
                    pass
