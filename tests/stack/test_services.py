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
