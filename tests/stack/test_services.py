"""A server that exits during start-up: :class:`visitflow.errors.ServiceFailed`, from the real
start-up path (:mod:`visitflow.stack.services`) and from ``visitflow up``.

Why: "port already taken" is the commonest way a local stack fails to start (a second
``visitflow up``, another program on 8180).  The error must come at once -- not after the
health-check timeout -- and carry the server's own words from its log, and ``visitflow up``
must say which server failed and where its log is.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest

from tests.fixtures.console import REPO, run_visitflow
from visitflow.errors import ServiceError, ServiceFailed
from visitflow.stack.services import start_service


@pytest.fixture
def taken_port():
    """A port something else holds: bound and listening, never answering HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_a_server_that_exits_during_start_up_is_service_failed_with_its_log(tmp_path, taken_port):
    service = start_service(
        "idp", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(REPO / "deployments" / "idp.yaml"),
                "--port", str(taken_port), "--keys-dir", str(tmp_path / "keys"), "--log-level", "warning"],
        log_dir=tmp_path / "logs", health_url=f"http://127.0.0.1:{taken_port}/health")
    try:
        # A timeout far longer than the test may take: only the exit can end the wait.
        with pytest.raises(ServiceFailed) as caught:
            service.wait_ready(timeout=3600)
    finally:
        service.stop()
    exc = caught.value
    assert isinstance(exc, ServiceError) and exc.code == "service_failed"
    assert str(exc).startswith(f"idp exited with {service.process.returncode}:\n"), str(exc)
    assert service.process.returncode != 0
    assert "address already in use" in str(exc).lower(), str(exc)   # the server's own words, from its log


def test_up_says_which_server_failed_and_where_its_log_is(tmp_path, taken_port):
    state = tmp_path / "state"
    proc = run_visitflow("up", "--state-dir", str(state), "--idp-port", str(taken_port), "--no-ui", timeout=300)
    out = proc.stdout
    assert proc.returncode != 0, out
    log = state.resolve() / "logs" / "idp.log"
    assert f"[visitflow] idp: failed to start; see {log}" in out, out
    assert "ServiceFailed: idp exited with" in out, out
    assert "address already in use" in log.read_text().lower()
    services = json.loads((state / "stack.json").read_text())["services"]
    assert list(services) == ["idp"], "nothing after the IdP was started"


#: a leader that, on SIGTERM, stops its own child (SIGKILL) and exits: the child records any
#: SIGTERM that reaches it from outside (the group-wide signal that hangs blueapi's shutdown)
_SUPERVISOR = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
def hit(*_):
    open(sys.argv[1], "w").write("SIGTERM reached the child")
signal.signal(signal.SIGTERM, hit)
open(sys.argv[1] + ".ready", "w").close()
while True:
    time.sleep(0.05)
''', sys.argv[1]])
def stop(*_):
    child.kill(); child.wait(); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
"""


def test_stop_signals_the_leader_first_so_it_stops_its_own_children(tmp_path):
    from tests.fixtures.waiting import wait_until

    mark = tmp_path / "child-hit"
    service = start_service("supervisor", [sys.executable, "-c", _SUPERVISOR, str(mark)], log_dir=tmp_path)
    wait_until(lambda: (tmp_path / "child-hit.ready").exists(), 60, "the child started")
    service.stop()
    assert service.process.poll() is not None, "the leader stopped"
    assert not mark.exists(), mark.read_text()   # only the leader was signalled: it stopped its child itself
    assert service.process.returncode == 0, service.log_tail()   # its own clean exit, not SIGKILL


def test_stop_still_ends_a_group_whose_leader_ignores_sigterm(tmp_path):
    ignoring = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.05)"
    service = start_service("stubborn", [sys.executable, "-c", ignoring], log_dir=tmp_path)
    from tests.fixtures.waiting import wait_until
    wait_until(lambda: "SigIgn" in _proc_status(service.process.pid) and _ignores_term(service.process.pid), 60,
               "the handler installed")
    service.stop(timeout=1)
    assert service.process.poll() is not None
    assert service.process.returncode == -9   # SIGKILL, after the leader's and the group's SIGTERM


def _proc_status(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read()
    except OSError:
        return ""


def _ignores_term(pid: int) -> bool:
    line = next((ln for ln in _proc_status(pid).splitlines() if ln.startswith("SigIgn:")), "SigIgn: 0")
    return bool(int(line.split()[1], 16) & (1 << (15 - 1)))
