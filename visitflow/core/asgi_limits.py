"""A cap on request-header size for visitflow's ASGI servers (Tiled, the token service).

Why a middleware and not uvicorn's ``h11_max_incomplete_event_size``: that option only binds
the pure-Python h11 parser; uvicorn picks ``httptools`` whenever it is installed (it is,
with ``uvicorn[standard]``, which Tiled brings), and httptools has no header limit — the red
team's 1 MiB ``Authorization`` header was parsed and its token validated (issue 20
finding 4).  Forcing ``--http h11`` would slow every request for the sake of a bad one.  So
this middleware counts the headers uvicorn hands over and refuses an oversized request
*before* any authentication runs (431 with the reason, or a websocket close 1009), which
is where the cost was: parsing is C, validating a 481 KiB JWT and 20,000 scopes is not.
What it does not bound is the socket read itself; a reverse proxy in front (nginx's
``large_client_header_buffers``) does that in production.

Pure ASGI, no dependencies: it lives in ``core`` so both servers can wrap their app in it.
"""

from __future__ import annotations

import json

__all__ = ['DEFAULT_MAX_HEADER_BYTES', 'TOO_BIG', 'header_bytes', 'HeaderLimit']

#: 16 KiB: h11's own default, and above the token service's largest token (12 KiB) plus the
#: rest of a normal request's headers.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
#: websocket close code "message too big" (RFC 6455 §7.4.1)
TOO_BIG = 1009


def header_bytes(scope) -> int:
    """Bytes of the request line's target and the headers, as received."""
    total = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return total + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())


class HeaderLimit:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.app, self.max_bytes = app, int(max_bytes)

    def __getattr__(self, name):   # e.g. ``app.state`` of the wrapped app, for whoever inspects it
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        size = header_bytes(scope)
        if size <= self.max_bytes:
            return await self.app(scope, receive, send)
        reason = f"request headers are {size} bytes; the limit is {self.max_bytes}"
        body = json.dumps({"detail": reason}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if scope["type"] == "websocket":
            if "websocket.http.response" not in (scope.get("extensions") or {}):
                return await send({"type": "websocket.close", "code": TOO_BIG, "reason": reason[:120]})
            prefix = "websocket."   # the ASGI denial-response extension: the same 431 and reason as HTTP
        else:
            prefix = ""
        await send({"type": f"{prefix}http.response.start", "status": 431, "headers": headers})
        await send({"type": f"{prefix}http.response.body", "body": body})
