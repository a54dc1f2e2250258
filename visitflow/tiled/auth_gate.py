"""Authenticate before Tiled does — asynchronously — and keep websockets honest.

Tiled 0.2.20 validates bearer tokens by calling the authenticator's *synchronous*
``decode_token`` on its event loop, so any network wait there (introspection, a JWKS fetch
for an unknown key id) stalls every request on the server, TiledWriter's appends included.
:class:`AuthGate`, a pure-ASGI middleware that ``visitflow tiled serve`` wraps around Tiled,
finds the token of each request first and awaits
:meth:`~visitflow.tiled.authenticator.VisitflowAuthenticator.prevalidate` (asynchronous,
bounded, single-flight, cached); ``decode_token`` then answers from that cache.

Websockets (``/api/v1/stream/single/...``) carry the token in ``?access_token=`` or in
Tiled's first-message auth (``{"type": "auth", "access_token": ...}``); both are
prevalidated the same way, so a subscription gets exactly the HTTP path's decision (Tiled
then applies the same access policy to the node).  Tiled checks a websocket's token only
when it connects; the gate re-checks it before every message it sends, so a subscription
ends (close code 4001, with the reason) when its token expires or — with introspection on —
is revoked, within the validation cache window (``--token-cache``): no data flows on a
token the HTTP path would refuse.  A client reconnects with a fresh token and resumes.

(``?access_token=`` needs :mod:`.principals` too: tiled 0.2.20 answers it with a 500.)
"""

from __future__ import annotations

import json
import logging
from typing import Optional
from urllib.parse import parse_qs

from fastapi import HTTPException

__all__ = ['TOKEN_ENDED', 'AuthGate']

logger = logging.getLogger(__name__)

#: Close code for "your token is no longer good" (4000-4999: application codes).
TOKEN_ENDED = 4001


def _bearer(scope) -> Optional[str]:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and token:
                return token.strip()
    return None


def _query_token(scope) -> Optional[str]:
    qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = qs.get("access_token")
    return values[0] if values else None


def _first_message_token(message) -> Optional[str]:
    raw = message.get("text")
    if raw is None and message.get("bytes"):
        raw = message["bytes"].decode("utf-8", "replace")
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("type") == "auth" and isinstance(doc.get("access_token"), str):
        return doc["access_token"]
    return None


class AuthGate:
    def __init__(self, app, authenticator):
        self.app = app
        self.auth = authenticator
        authenticator.gated = True

    async def _prevalidate(self, token: str) -> None:
        try:
            await self.auth.prevalidate(token)
        except Exception:  # noqa: BLE001 - never break the request: decode_token validates inline
            logger.exception("prevalidation failed unexpectedly")

    def _refusal(self, token: str) -> Optional[HTTPException]:
        hit = self.auth._cached(token)
        return hit if isinstance(hit, HTTPException) else None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "http":
            token = _bearer(scope)
            if token:
                await self._prevalidate(token)
            return await self.app(scope, receive, send)
        if kind != "websocket":
            return await self.app(scope, receive, send)

        state = {"token": _bearer(scope) or _query_token(scope), "first": True, "closed": False}
        if state["token"]:
            await self._prevalidate(state["token"])

        async def gated_receive():
            message = await receive()
            if state["first"] and message.get("type") == "websocket.receive":
                state["first"] = False
                token = _first_message_token(message)
                if token and not state["token"]:
                    state["token"] = token
                    await self._prevalidate(token)
            return message

        async def gated_send(message):
            if state["closed"]:
                return  # we ended the subscription; Tiled's handler is winding down
            if message.get("type") == "websocket.send" and state["token"]:
                await self._prevalidate(state["token"])  # a no-op while the cached answer is fresh
                refusal = self._refusal(state["token"])
                if refusal is not None:
                    state["closed"] = True
                    reason = f"token no longer accepted: {refusal.detail}"[:120]
                    logger.info("closing a stream subscription: %s", reason)
                    return await send({"type": "websocket.close", "code": TOKEN_ENDED, "reason": reason})
            return await send(message)

        return await self.app(scope, gated_receive, gated_send)
