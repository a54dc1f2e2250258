"""Tell the access policy *which child* a create request is about to make.

Tiled's access-policy protocol decides "may this principal ``create:node`` under node X?"
without the new node's key, and ``init_node`` gets no key or parent either.  But a
run-scoped writer (``write:processed:a1/uid1``) may create ``processed/a1/uid1`` and not
``processed/a1/uid2`` — the answer depends on the key.  This pure-ASGI middleware, wrapped
around the Tiled app by ``visitflow tiled serve``, reads the ``id`` of ``POST
/api/v1/{metadata,register}/<path>`` bodies (small JSON documents; the body is replayed to
Tiled unchanged) and publishes it in a context variable for the policy.

It also passes the writer's fence token (the ``X-Visitflow-Fence`` header, :mod:`.live_fence`)
to the policy, and runs each write request carrying one under that flow run's lock, so the
policy's fence check and the write it allows are one step.

It also lists the ``assets[].data_uri`` of file registrations (``POST /register``, ``PUT
/data_source``), so the policy can confine them to the visit's data directory (see
:mod:`.file_roots`).  The middleware only extracts facts; every decision is the policy's.

Without the middleware (e.g. plain ``tiled serve config``) :data:`REQUEST` stays ``None``
and the policy fails closed: only visit-wide writers may create runs.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass, replace

from .file_roots import asset_uris
from ..core.fence import FENCE_HEADER, parse_fence
from .live_fence import FenceLocks

__all__ = [
    'CREATE_ROUTES', 'REGISTER_ROUTES', 'API_MARKER', 'RequestInfo', 'REQUEST', 'parse_target',
    'parse_body', 'RequestContextMiddleware',
]

CREATE_ROUTES = ("metadata", "register")
#: (method, route) of requests that point nodes at files.
REGISTER_ROUTES = (("POST", "register"), ("PUT", "data_source"))
API_MARKER = "/api/v1/"
#: Tiled 0.2.20 routes whose node path starts after a second fixed segment.
_TWO_SEGMENT_ROUTES = {
    "array": ("block", "full"), "table": ("partition", "full"), "ragged": ("block", "full"),
    "node": ("full",), "container": ("full",), "awkward": ("buffers", "full"),
    "asset": ("bytes", "manifest"), "stream": ("single", "close"), "webhooks": ("target",),
}


@dataclass(frozen=True)
class RequestInfo:
    method: str
    route: str                 # first path segment after /api/v1/ ("metadata", "array", ...)
    path: tuple[str, ...]      # node path the request targets
    new_key: str | None = None  # the "id" of a node being created, if given and readable
    #: for a file registration, the data URIs of its assets; None if the body was unreadable
    asset_uris: tuple[str, ...] | None = None
    #: the writer's fence token (``X-Visitflow-Fence``), as sent; None when absent
    fence: str | None = None

    def creates_child_of(self, path: tuple[str, ...] | list[str]) -> bool:
        return self.method == "POST" and self.route in CREATE_ROUTES and self.path == tuple(path)

    @property
    def target(self) -> tuple[str, ...]:
        """The node path the request acts on: ``/array/block/raw/a1/u`` -> ``("raw", "a1", "u")``
        (Tiled's data routes have a second fixed segment; ``/metadata/...`` has none)."""
        if self.path and self.route in _TWO_SEGMENT_ROUTES and self.path[0] in _TWO_SEGMENT_ROUTES[self.route]:
            return self.path[1:]
        return self.path

    @property
    def writes(self) -> bool:
        """A request that changes the node it targets (creates under it, updates, appends,
        deletes); Tiled's POST reads (``/table/full``, ``/container/full``...) are not."""
        return self.method in ("PUT", "PATCH", "DELETE") or (self.method == "POST" and self.route in CREATE_ROUTES)

    @property
    def registers_files(self) -> bool:
        return (self.method, self.route) in REGISTER_ROUTES

    @property
    def registered_node_path(self) -> tuple[str, ...]:
        """The node whose files are registered (the new child, for ``POST /register``)."""
        if self.method == "POST":
            return self.path + (self.new_key or "_",)
        return self.path


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


def parse_body(body: bytes, content_type: str):
    """The decoded JSON (or msgpack) body, or None if it cannot be decoded."""
    try:
        if "msgpack" in content_type:
            import msgpack

            return msgpack.unpackb(body)
        return json.loads(body)
    except Exception:
        return None


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would run the app in another task)."""

    def __init__(self, app, max_body: int = 16 * 1024 * 1024):
        self.app = app
        self.max_body = max_body
        self.fence_locks = FenceLocks()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        info = parse_target(scope["method"], scope.get("path", ""))
        fence_value = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                            if k.decode("latin-1").lower() == FENCE_HEADER), None)
        if info is not None and fence_value is not None:
            info = replace(info, fence=fence_value)
        if info is not None and ((info.method == "POST" and info.route in CREATE_ROUTES) or info.registers_files):
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
                doc = parse_body(b"".join(chunks), headers.get("content-type", ""))
                key = doc.get("id") if isinstance(doc, dict) and isinstance(doc.get("id"), str) else None
                uris = tuple(asset_uris(doc)) if info.registers_files and doc is not None else None
                info = RequestInfo(info.method, info.route, info.path, key, uris, info.fence)
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
            fence = parse_fence(info.fence) if info is not None and info.writes else None
            if fence is not None:
                await self.fence_locks.run(fence.flow_run_id, lambda: self.app(scope, downstream_receive, send))
            else:
                await self.app(scope, downstream_receive, send)
        finally:
            REQUEST.reset(token)
