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

Every request carries at most one credential: more than one (two ``access_token`` values,
a header beside a query token, a first message beside either) is refused with a 400 or a
close 4400 and the reason; :mod:`.credentials` is the one reading, shared with the
authenticator's ``decode_token``, so the token re-checked here is the one Tiled authorised.

(``?access_token=`` needs :mod:`.principals` too: tiled 0.2.20 answers it with a 500.)

A websocket may also carry its bearer token in the upgrade request's ``Authorization``
header — what :mod:`visitflow.flow.push` sends, since a Tiled started with
``--allow-anonymous`` (as blueapi's client needs) never reads a first message, and a query
token would be written to access logs.  Tiled 0.2.20's websocket route reads only ``Apikey``
from that header (``Bearer`` is a 400), so the gate hands the token on as Tiled's
``access_token`` query parameter in the scope *it passes to Tiled* (a copy: the server's own
scope, which its access log prints, keeps the URL the client sent).  It is still the one
credential of the request, validated and re-checked like any other.
"""

from __future__ import annotations

import json
import logging
from typing import Optional
from urllib.parse import quote

from fastapi import HTTPException

from ..errors import MoreThanOneCredential
from .credentials import (CREDENTIAL, Credential, credentials_of, first_message_credentials, the_credential,
                          too_many)

__all__ = ['TOKEN_ENDED', 'TWO_CREDENTIALS', 'AuthGate', 'header_token_as_query']

logger = logging.getLogger(__name__)

#: Close code for "your token is no longer good" (4000-4999: application codes).
TOKEN_ENDED = 4001
#: Close code for a first message that brings a credential beside the handshake's one.
TWO_CREDENTIALS = 4400


def header_token_as_query(scope, token: str) -> dict:
    """A copy of a websocket ``scope`` whose ``Authorization: Bearer`` header is Tiled's
    ``?access_token=`` instead (the header removed: one credential, in the place Tiled reads)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"authorization"]
    query = scope.get("query_string", b"")
    extra = b"access_token=" + quote(token, safe="").encode("ascii")
    return dict(scope, headers=headers, query_string=(query + b"&" + extra) if query else extra)


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
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        try:
            chosen = the_credential(credentials_of(scope))
        except MoreThanOneCredential as exc:
            return await self._refuse(scope, send, str(exc))
        token = chosen.bearer if chosen is not None else None
        CREDENTIAL.set(token)   # decode_token accepts this token and no other (see .credentials)
        if kind == "http":
            if token:
                await self._prevalidate(token)
            return await self.app(scope, receive, send)

        state = {"token": token, "had_credential": chosen is not None, "first": True, "closed": False}
        if token:
            await self._prevalidate(token)
            if chosen.where == "Authorization header":
                scope = header_token_as_query(scope, token)

        async def gated_receive():
            message = await receive()
            if state["first"] and message.get("type") == "websocket.receive":
                state["first"] = False
                try:
                    second = the_credential(first_message_credentials(message))
                except MoreThanOneCredential as exc:
                    return await self._end(send, state, str(exc))
                if second is not None and state["had_credential"]:
                    return await self._end(send, state, str(too_many([Credential("handshake", "", ""), second])))
                if second is not None:
                    state["had_credential"] = True
                    state["token"] = second.bearer
                    CREDENTIAL.set(second.bearer)  # this task's context: Tiled's first-message auth
                    if second.bearer:
                        await self._prevalidate(second.bearer)
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

    @staticmethod
    async def _refuse(scope, send, reason: str) -> None:
        """400 with the reason, before Tiled sees the request (a websocket: as its handshake's
        answer, through the ASGI denial-response extension uvicorn offers; without it, a plain
        close, which the server turns into a 403)."""
        kind = scope["type"]
        logger.info("refusing a request: %s", reason)
        if kind == "websocket" and "websocket.http.response" not in (scope.get("extensions") or {}):
            return await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        body = json.dumps({"detail": reason}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        prefix = "http" if kind == "http" else "websocket.http"
        await send({"type": f"{prefix}.response.start", "status": 400, "headers": headers})
        await send({"type": f"{prefix}.response.body", "body": body})

    @staticmethod
    async def _end(send, state, reason: str):
        """A second credential in the first message: close the (accepted) socket, say why,
        and tell Tiled's handler the client left."""
        state["closed"] = True
        logger.info("closing a stream subscription: %s", reason)
        await send({"type": "websocket.close", "code": TWO_CREDENTIALS, "reason": reason[:120]})
        return {"type": "websocket.disconnect", "code": TWO_CREDENTIALS}
