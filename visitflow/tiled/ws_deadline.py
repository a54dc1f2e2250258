"""A deadline for a Tiled websocket subscription's first message.

Why: a subscription that carries no credential in its headers or query is accepted by Tiled
0.2.20, which then waits — without limit — for a first message ``{"type": "auth", ...}``.
A client that connects and never sends it holds a connection, a task and a slot of the
server's file descriptors for ever (issue 20 finding 4); a few thousand such sockets
exhaust the server without ever presenting a token.  This pure-ASGI middleware, outside
:class:`~.auth_gate.AuthGate` (kept separate from it: the gate decides *which* credential,
this only *when*), gives that first message ``VISITFLOW_WS_FIRST_MESSAGE_SECONDS``
(default 10 s) to arrive.  Late, the socket is closed with code 1008 and the reason, and
Tiled's handler sees a disconnect and winds down.  Subscriptions that carry their token up
front are not touched: Tiled does not wait for a message from them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import parse_qs

__all__ = ['ENV', 'DEFAULT_SECONDS', 'POLICY_VIOLATION', 'FirstMessageDeadline']

log = logging.getLogger(__name__)

ENV = "VISITFLOW_WS_FIRST_MESSAGE_SECONDS"
DEFAULT_SECONDS = 10.0
POLICY_VIOLATION = 1008


def _has_upfront_credential(scope) -> bool:
    if any(k.lower() == b"authorization" for k, _ in scope.get("headers") or ()):
        return True
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    return bool(query.get("access_token") or query.get("api_key"))


class FirstMessageDeadline:
    def __init__(self, app, seconds: float | None = None):
        self.app = app
        self.seconds = float(os.environ.get(ENV, DEFAULT_SECONDS) if seconds is None else seconds)

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or _has_upfront_credential(scope):
            return await self.app(scope, receive, send)
        state = {"accepted": False, "waiting": True, "closed": False}

        async def timed_receive():
            if not (state["accepted"] and state["waiting"]):
                return await receive()   # the connect event, or after the first message
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except asyncio.TimeoutError:
                reason = f"no first message within {self.seconds:g} s (expected {{\"type\": \"auth\", ...}})"
                log.info("closing a websocket subscription: %s", reason)
                state["closed"] = True
                await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": reason})
                return {"type": "websocket.disconnect", "code": POLICY_VIOLATION}
            if message.get("type") == "websocket.receive":
                state["waiting"] = False
            return message

        async def guarded_send(message):
            if state["closed"]:
                return   # we closed it; Tiled's own close on the disconnect goes nowhere
            if message.get("type") == "websocket.accept":
                state["accepted"] = True
            return await send(message)

        return await self.app(scope, timed_receive, guarded_send)
