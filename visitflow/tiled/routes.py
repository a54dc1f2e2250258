"""Which of Tiled's routes visitflow serves: every route is covered by the access policy, named
on an allow-list with the reason it is safe, or closed.

Why: the access policy is written against Tiled's node API (everything that looks a node up
through ``get_entry``, which asks the policy).  Tiled 0.2.20 also mounts an experimental
GraphQL API (``/api/graphql``, the entity/link graph) that the policy was never written for:
a visit-a2 user could learn which nodes exist in visit a1 and bind rows to them, and any
writer could edit a server-wide namespace registry (issue 20, finding 2).  So:

* :data:`CLOSED_PREFIXES` are removed from the app (:func:`close_routes`, called by
  :func:`visitflow.tiled.server.build_app`) and :class:`ClosedRoutes` answers them with a 404
  that says why (a route a later Tiled adds under the same prefix stays closed too);
* :func:`served_routes` lists every route of the app as served, for the test
  (tests/tiled/test_tiled_routes.py) that fails on any route that is neither covered nor on
  its allow-list — the next Tiled release's new API cannot arrive unreviewed.

Hand-rolled: Tiled has no setting to leave the graph router out (it is mounted whenever the
tree is a catalog); FastAPI's :func:`fastapi.routing.iter_route_contexts` (0.140) flattens
included routers, older FastAPI lists them flat in ``app.routes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

__all__ = ['CLOSED_PREFIXES', 'ClosedRoutes', 'ServedRoute', 'close_routes', 'closed_reason', 'served_routes']

#: Path prefixes visitflow does not serve, and why.
CLOSED_PREFIXES = {
    "/api/graphql": "Tiled's experimental GraphQL API is off on this server: visitflow's access policy "
                    "does not cover it (node existence and a server-wide registry leaked through it)",
}


@dataclass(frozen=True)
class ServedRoute:
    kind: str                     # "http" | "websocket" | "mount"
    path: str
    methods: frozenset[str]
    endpoint: Optional[Callable]
    route: object                 # the top-level entry of app.router.routes it came from


def _flat(routes) -> Iterator[tuple[object, object]]:
    """(top-level route, effective route) pairs, with included routers flattened."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI < 0.140: included routes are copied flat into app.routes
        for route in routes:
            yield route, route
        return
    for top in routes:
        for ctx in iter_route_contexts([top]):
            yield top, ctx


def served_routes(app) -> list[ServedRoute]:
    """Every route of a FastAPI app (Tiled's), as the router matches it."""
    from starlette.routing import Mount, WebSocketRoute

    out = []
    for top, route in _flat(app.router.routes):
        original = getattr(route, "original_route", route)
        if isinstance(original, Mount):
            kind = "mount"
        elif isinstance(original, WebSocketRoute):
            kind = "websocket"
        else:
            kind = "http"
        # A websocket's context carries no path or endpoint: its Starlette route does.
        concrete = getattr(getattr(route, "_route_context", None), "starlette_route", None) or original
        path = getattr(route, "path", None) or getattr(concrete, "path", "") or ""
        endpoint = getattr(route, "endpoint", None) or getattr(original, "endpoint", None)
        out.append(ServedRoute(kind, path, frozenset(getattr(route, "methods", None) or ()), endpoint, top))
    return out


def closed_reason(path: str) -> Optional[str]:
    for prefix, reason in CLOSED_PREFIXES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return reason
    return None


def close_routes(app) -> list[str]:
    """Remove the routes under :data:`CLOSED_PREFIXES` (an included router whose routes all
    lie there goes as a whole); returns the paths removed."""
    removed, keep_tops = [], []
    by_top: dict[int, list[ServedRoute]] = {}
    for served in served_routes(app):
        by_top.setdefault(id(served.route), []).append(served)
    for top in list(app.router.routes):
        routes = by_top.get(id(top), [])
        if routes and all(closed_reason(r.path) for r in routes):
            removed += [r.path for r in routes]
            continue
        keep_tops.append(top)   # partly closed: ClosedRoutes still answers the closed paths
    app.router.routes[:] = keep_tops
    return removed


class ClosedRoutes:
    """Pure ASGI: a 404 with the reason for anything under :data:`CLOSED_PREFIXES`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = "/" + "/".join(s for s in scope.get("path", "").split("/") if s)
            reason = closed_reason(path)
            if reason is not None:
                body = json.dumps({"detail": reason}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if scope["type"] == "websocket":
                    if "websocket.http.response" not in (scope.get("extensions") or {}):
                        return await send({"type": "websocket.close", "code": 1008})
                    prefix = "websocket.http"
                else:
                    prefix = "http"
                await send({"type": f"{prefix}.response.start", "status": 404, "headers": headers})
                return await send({"type": f"{prefix}.response.body", "body": body})
        return await self.app(scope, receive, send)
