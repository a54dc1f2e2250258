"""No blocking network I/O on Tiled's event loop in our authenticator (``stream``).

A dedicated dev IdP sits behind :class:`~tests.fixtures.stall_proxy.StallProxy` (its issuer *is* the
proxy), so the test can make the IdP's introspection — or its JWKS — hang for 5 s while
tokens are still minted.  A request with a new token then waits for the IdP; requests with
tokens Tiled has already validated must not wait with it.  The control is the same Tiled
config served by plain ``tiled serve config`` (no :class:`~visitflow.tiled.auth_gate.AuthGate`:
``decode_token`` validates inline, on the loop): there the cached-token requests *do* wait,
which shows the test can tell the difference.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from visitflow.stack.services import free_port, start_service
from visitflow.tiled.config import prepare_state_dir, render_config, write_config

from tests.fixtures.idp_fixtures import IDP_CONFIG, IdPHandle
from tests.fixtures.stall_proxy import StallProxy
from tests.fixtures.tiled_fixtures import running_tiled

pytestmark = pytest.mark.stream

STALL = 5.0


@pytest.fixture(scope="module")
def stalling_idp(tmp_path_factory):
    from visitflow.token_service.keys import KeyStore

    tmp = tmp_path_factory.mktemp("idp-stall")
    port = free_port()
    proxy = StallProxy(f"http://127.0.0.1:{port}")
    keys_dir = tmp / "idp-keys"
    KeyStore(keys_dir)
    service = start_service(
        "idp", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(IDP_CONFIG), "--port", str(port),
                "--issuer", proxy.url, "--keys-dir", str(keys_dir), "--log-level", "warning"],
        log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/health")
    service.wait_ready(timeout=60)
    try:
        yield IdPHandle(proxy.url, keys_dir, service), proxy
    finally:
        service.stop()
        proxy.close()


def _plain_tiled(idp, tmp: Path):
    """The same config under ``tiled serve config``: no AuthGate, no request middleware."""
    port = free_port()
    state = prepare_state_dir(tmp / "state")
    config = render_config(issuer=idp.issuer, state_dir=state, port=port, introspect_client_id="tiled",
                           cache_seconds=120)
    path = write_config(config, tmp / "tiled.yml")
    tiled_exe = Path(sys.executable).with_name("tiled")
    uri = f"http://127.0.0.1:{port}"
    service = start_service("tiled-plain", [str(tiled_exe), "serve", "config", str(path), "--port", str(port)],
                            log_dir=tmp / "logs", health_url=f"{uri}/api/v1/",
                            env={"VISITFLOW_TILED_CLIENT_SECRET": "tiled-dev-secret"})
    service.wait_ready(timeout=120)
    return uri, service


def _get(uri, token):
    return httpx.get(f"{uri}/api/v1/metadata/", headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _race(uri, idp, proxy, stall_path: str, new_token: str) -> dict:
    """A request with ``new_token`` while ``stall_path`` hangs, and 10 with a cached token."""
    cached = idp.token("alice")
    assert _get(uri, cached).status_code == 200          # validated (and introspected) once: cached
    proxy.stalled.clear()
    proxy.stall[stall_path] = STALL
    slow: dict = {}

    def stalled_request():
        t0 = time.monotonic()
        slow["status"] = _get(uri, new_token).status_code
        slow["latency"] = time.monotonic() - t0
        slow["end"] = time.monotonic()

    worker = threading.Thread(target=stalled_request)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while stall_path not in proxy.stalled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stall_path in proxy.stalled, "the new token never reached the IdP"
        fast = []
        for _ in range(10):
            t0 = time.monotonic()
            r = _get(uri, cached)
            fast.append((r.status_code, time.monotonic() - t0, time.monotonic()))
        pending_after_fast = worker.is_alive()
    finally:
        worker.join(60)
        proxy.stall.pop(stall_path, None)
    return {"fast": fast, "slow": slow, "pending_after_fast": pending_after_fast}


def test_stalled_introspection_does_not_stall_cached_tokens(stalling_idp, tmp_path_factory):
    idp, proxy = stalling_idp
    with running_tiled(idp, tmp_path_factory.mktemp("tiled-gated"),
                       extra_args=("--introspect-client", "tiled", "--token-cache", "120"),
                       env={"VISITFLOW_TILED_CLIENT_SECRET": "tiled-dev-secret"}) as tiled:
        result = _race(tiled.uri, idp, proxy, "/introspect", idp.token("alice"))
        assert all(status == 200 for status, _, _ in result["fast"]), result
        # every cached-token request finished while the stalled one was still waiting
        assert result["pending_after_fast"], result
        assert max(end for _, _, end in result["fast"]) < result["slow"]["end"], result
        # the stalled one is answered, not lost: accepted after the stall or 503 "cannot confirm"
        assert result["slow"]["status"] in (200, 503), result

        # an unknown key id waits for a JWKS refresh — off the loop too — and is then refused
        foreign = idp.sign(idp.claims(aud=["tiled"]), key=idp.other_key, headers={"kid": "rotated-away"})
        result = _race(tiled.uri, idp, proxy, "/jwks", foreign)
        assert all(status == 200 for status, _, _ in result["fast"]), result
        assert result["pending_after_fast"], result
        assert result["slow"]["status"] == 401, result


def test_control_without_the_gate_cached_tokens_do_wait(stalling_idp, tmp_path_factory):
    """Plain ``tiled serve``: decode_token introspects inline and the whole server waits."""
    idp, proxy = stalling_idp
    uri, service = _plain_tiled(idp, tmp_path_factory.mktemp("tiled-plain"))
    try:
        result = _race(uri, idp, proxy, "/introspect", idp.token("alice"))
        assert all(status == 200 for status, _, _ in result["fast"]), result
        first_fast = min(latency for _, latency, _ in result["fast"])
        assert first_fast > STALL / 3 or not result["pending_after_fast"], result
    finally:
        service.stop()
