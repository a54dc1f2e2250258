"""Tell the access policy *which child* a create request is about to make.

Tiled's access-policy protocol decides "may this principal ``create:node`` under node X?"
without the new node's key, and ``init_node`` gets no key or parent either.  But a
run-scoped writer (``write:processed:a1/uid1``) may create ``processed/a1/uid1`` and not
``processed/a1/uid2`` — the answer depends on the key.  This pure-ASGI middleware, wrapped
around the Tiled app by ``visitflow tiled serve``, reads the ``id`` of ``POST
/api/v1/{metadata,register}/<path>`` bodies (small JSON documents; the body is replayed to
Tiled unchanged) and publishes it in a context variable for the policy.

Without the middleware (e.g. plain ``tiled serve config``) :data:`REQUEST` stays ``None``
and the policy fails closed: only visit-wide writers may create runs.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass

CREATE_ROUTES = ("metadata", "register")
API_MARKER = "/api/v1/"


@dataclass(frozen=True)
class RequestInfo:
    method: str
    route: str                 # first path segment after /api/v1/ ("metadata", "array", ...)
    path: tuple[str, ...]      # node path the request targets
    new_key: str | None = None  # the "id" of a node being created, if given and readable

    def creates_child_of(self, path: tuple[str, ...] | list[str]) -> bool:
        return self.method == "POST" and self.route in CREATE_ROUTES and self.path == tuple(path)


#: The current request, as seen by the middleware; ``None`` when it is not installed.
REQUEST: ContextVar[RequestInfo | None] = ContextVar("visitflow_tiled_request", default=None)


def parse_target(method: str, url_path: str) -> RequestInfo | None:
    """``POST /api/v1/metadata/raw/a1`` -> RequestInfo("POST", "metadata", ("raw", "a1"))."""
    i = url_path.find(API_MARKER)
    if i < 0:
        return None
    rest = url_path[i + len(API_MARKER):]
    route, _, tail = rest.partition("/")
    return RequestInfo(method.upper(), route, tuple(s for s in tail.split("/") if s))


def key_from_body(body: bytes, content_type: str) -> str | None:
    try:
        if "msgpack" in content_type:
            import msgpack

            doc = msgpack.unpackb(body)
        else:
            doc = json.loads(body)
    except Exception:
        return None
    key = doc.get("id") if isinstance(doc, dict) else None
    return key if isinstance(key, str) else None


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would run the app in another task)."""

    def __init__(self, app, max_body: int = 16 * 1024 * 1024):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = parse_target(scope["method"], scope.get("path", ""))
        if info is not None and info.method == "POST" and info.route in CREATE_ROUTES:
            chunks, size, more = [], 0, True
            messages = []
            while more:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                chunks.append(chunk)
                more = message.get("more_body", False)
                if size > self.max_body:
                    break
            if not more and size <= self.max_body:
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                key = key_from_body(b"".join(chunks), headers.get("content-type", ""))
                info = RequestInfo(info.method, info.route, info.path, key)
            pending = list(messages)

            async def replay():
                if pending:
                    return pending.pop(0)
                return await receive()

            downstream_receive = replay
        else:
            downstream_receive = receive
        token = REQUEST.set(info)
        try:
            await self.app(scope, downstream_receive, send)
        finally:
            REQUEST.reset(token)
