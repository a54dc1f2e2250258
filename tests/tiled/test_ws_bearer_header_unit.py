"""A websocket's bearer token in the upgrade request's header (issue 19), as pure logic.

The gate hands a header token to Tiled as ``?access_token=`` in a *copy* of the scope: the
server's own scope (what uvicorn's access log prints) keeps the URL the client sent, so the
token never reaches a log line.  And the push client, refused a bearer header by a Tiled
without the gate (400 "...like 'Apikey SECRET'"), switches to first-message auth.
The end-to-end proofs, on real Tiled, are tests/tiled/test_tiled_stream_auth.py (``header``
mode) and tests/trigger/test_blueapi_push.py.
"""

from __future__ import annotations

import asyncio
import json
import threading

from websockets.sync.server import serve

from visitflow.flow.push import FIRST_MESSAGE, HEADER, NodeSubscription
from visitflow.tiled.auth_gate import AuthGate, header_token_as_query


class _Authenticator:
    """Stands in for VisitflowAuthenticator's cache: every token is fine."""

    def __init__(self):
        self.prevalidated = []

    async def prevalidate(self, token):
        self.prevalidated.append(token)

    def _cached(self, token):
        return None


def _through_gate(scope):
    seen = {}

    async def app(inner, receive, send):
        seen["scope"] = inner

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        seen.setdefault("sent", []).append(message)

    auth = _Authenticator()
    asyncio.run(AuthGate(app, auth)(scope, receive, send))
    return seen, auth


def _ws_scope(headers, query=b"envelope_format=msgpack&start=1"):
    return {"type": "websocket", "path": "/api/v1/stream/single/raw/a1/u", "headers": headers,
            "query_string": query}


def test_header_token_reaches_tiled_as_its_query_token_and_the_server_scope_is_untouched():
    scope = _ws_scope([(b"host", b"x"), (b"authorization", b"Bearer tok.en/+=")])
    seen, auth = _through_gate(scope)
    inner = seen["scope"]
    assert inner is not scope
    assert inner["query_string"] == b"envelope_format=msgpack&start=1&access_token=tok.en%2F%2B%3D"
    assert (b"authorization", b"Bearer tok.en/+=") not in inner["headers"] and (b"host", b"x") in inner["headers"]
    assert scope["query_string"] == b"envelope_format=msgpack&start=1", "the logged URL must not gain the token"
    assert auth.prevalidated == ["tok.en/+="]


def test_query_and_first_message_tokens_are_passed_as_they_came():
    scope = _ws_scope([(b"host", b"x")], b"start=1&access_token=abc")
    seen, _ = _through_gate(scope)
    assert seen["scope"]["query_string"] == b"start=1&access_token=abc"
    seen, _ = _through_gate(_ws_scope([(b"host", b"x")]))
    assert b"access_token" not in seen["scope"]["query_string"]


def test_an_apikey_header_is_left_for_tiled():
    seen, auth = _through_gate(_ws_scope([(b"authorization", b"Apikey 0123")]))
    assert seen["scope"]["headers"] == [(b"authorization", b"Apikey 0123")] and auth.prevalidated == []


def test_header_token_as_query_without_a_query_string():
    out = header_token_as_query({"headers": [(b"Authorization", b"Bearer t")]}, "t")
    assert out == {"headers": [], "query_string": b"access_token=t"}


def test_subscription_falls_back_to_first_message_when_a_bearer_header_is_refused():
    """A websocket server that, like tiled 0.2.20 without the gate, refuses ``Bearer`` in the
    header with a 400 and reads the token from the first message (emulated with ``websockets``'
    own server)."""
    handshakes, firsts = [], []

    def process_request(connection, request):
        handshakes.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization"):
            return connection.respond(400, '{"detail":"Authorization header must be formatted like \'Apikey SECRET\'"}')
        return None

    def handler(ws):
        firsts.append(json.loads(ws.recv(timeout=10)))
        ws.send(json.dumps({"type": "array-schema", "sequence": 0}))
        ws.close(1000, "Producer ended stream")

    with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        got, changed = [], threading.Event()
        sub = NodeSubscription(f"ws://127.0.0.1:{port}/api/v1/stream/single/raw/a1/u", lambda: "tok",
                               lambda s, m: got.append(m), changed.set)
        assert sub.auth == HEADER
        sub.start()
        sub.join(30)
        server.shutdown()
    assert not sub.is_alive()
    assert handshakes == ["Bearer tok", None], handshakes
    assert firsts == [{"type": "auth", "access_token": "tok"}]
    assert sub.auth == FIRST_MESSAGE and sub.served and sub.ended and not sub.disabled
    assert [m["type"] for m in got] == ["array-schema"]
