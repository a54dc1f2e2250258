"""Issue 20 finding 4 at Tiled, on the real server as ``visitflow tiled serve`` builds it:
request headers over the cap are refused (431, with the reason) before any token is looked
at — HTTP and the websocket upgrade alike; a stream subscription that never sends its first
(auth) message is closed with 1008 and the reason; one that sends it in time is served."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from visitflow.core.asgi_limits import DEFAULT_MAX_HEADER_BYTES
from visitflow.flow.push import stream_url
from visitflow.tiled.ws_deadline import DEFAULT_SECONDS, POLICY_VIOLATION

from tests.fixtures.scans import run_scan

pytestmark = pytest.mark.security


def test_oversized_headers_get_431_with_the_reason_and_normal_ones_pass(idp, tiled_server):
    alice = idp.token("alice")
    ok = tiled_server.get("metadata/raw/a1", alice, headers={"x-pad": "p" * 4096})
    assert ok.status_code == 200, ok.text
    for headers in ({"authorization": "Bearer " + "x" * (1 << 20)},          # the red team's 1 MiB header
                    {"authorization": f"Bearer {alice}", "x-pad": "p" * DEFAULT_MAX_HEADER_BYTES}):
        resp = httpx.get(f"{tiled_server.uri}/api/v1/metadata/raw/a1", headers=headers, timeout=60)
        assert resp.status_code == 431, resp.text
        assert resp.json()["detail"].startswith("request headers are ")
        assert resp.json()["detail"].endswith(f" bytes; the limit is {DEFAULT_MAX_HEADER_BYTES}")


def test_an_oversized_websocket_upgrade_is_refused_with_431(tiled_server):
    url = stream_url(f"{tiled_server.uri}/api/v1/metadata/raw/a1")
    with pytest.raises(InvalidStatus) as caught:
        # several headers, each under the websocket parser's own 8 KiB line limit, together over the cap
        pads = {f"x-pad-{i}": "p" * 6000 for i in range(2 * DEFAULT_MAX_HEADER_BYTES // 6000)}
        with ws_connect(url, open_timeout=30, additional_headers=pads):
            pass
    assert caught.value.response.status_code == 431
    assert b"the limit is" in caught.value.response.body


def _first_message(url: str, message: str | None) -> tuple:
    """Connect, optionally send ``message``, and read until the server speaks or closes."""
    with ws_connect(url, open_timeout=30, max_size=None) as ws:
        if message is not None:
            ws.send(message)
        try:
            raw = ws.recv(timeout=DEFAULT_SECONDS * 4)
        except ConnectionClosed as exc:
            return ("closed", exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
        except TimeoutError:
            return ("open", None, "")
        return ("message", None, raw)


def test_a_subscription_that_never_sends_its_first_message_is_closed(idp, tiled_server):
    uid = run_scan(tiled_server.uri, idp.token("alice"), num=3)
    url = stream_url(f"{tiled_server.uri}/api/v1/metadata/raw/a1/{uid}") + "?envelope_format=json&start=1"
    kind, code, reason = _first_message(url, None)
    assert (kind, code) == ("closed", POLICY_VIOLATION), (kind, code, reason)
    assert reason == f"no first message within {DEFAULT_SECONDS:g} s (expected {{\"type\": \"auth\", ...}})"
    # control: the same subscription with its first message in time is served
    kind, code, raw = _first_message(url, json.dumps({"type": "auth", "access_token": idp.token("alice")}))
    assert kind == "message", (kind, code, raw)
