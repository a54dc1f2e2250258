"""Run Tiled in-process with our request-context middleware around it.

Why not ``tiled serve config``: the access policy needs to know which key a create request
carries (see :mod:`.request_context`), and only the process that builds the app can wrap
it.  Building the app ourselves also skips a subprocess and a YAML round trip.  The same
goes for :class:`~.auth_gate.AuthGate`, which validates tokens asynchronously before Tiled's
synchronous ``decode_token`` sees them and re-checks websocket subscriptions, for
:mod:`.principals` (cached principal lookups; websocket ``?access_token=`` fixed), and for
:mod:`.routes` (Tiled's GraphQL API, which the access policy does not cover, closed).
"""

from __future__ import annotations

import logging
from typing import Any

from . import principals
from .auth_gate import AuthGate
from .request_context import RequestContextMiddleware
from .routes import ClosedRoutes, close_routes

__all__ = ['build_app', 'serve']


def build_app(config: dict[str, Any]):
    """The Tiled ASGI app for a config dict (see :func:`.config.render_config`), wrapped."""
    from .tiled_compat import Config, build_app_from_config

    parsed = Config.model_validate(config)
    app = build_app_from_config(parsed)
    policy = getattr(app.state, "access_policy", None)
    for part in ("tag_rows", "frozen_runs"):   # the policy reads/writes through the catalog
        holder = getattr(policy, part, None)
        if holder is not None:
            holder.catalog = getattr(app.state, "root_tree", None)
    principals.install(app)
    close_routes(app)   # GraphQL: not covered by the access policy (see .routes)
    wrapped = ClosedRoutes(RequestContextMiddleware(app))
    authenticators = list((parsed.authentication.authenticators or {}).values()) if parsed.authentication else []
    gate = next((a for a in authenticators if hasattr(a, "prevalidate")), None)
    return AuthGate(wrapped, gate) if gate is not None else wrapped


def serve(config: dict[str, Any], *, log_level: str = "info") -> None:
    """Blocking: serve until SIGINT/SIGTERM."""
    import uvicorn

    uv = dict(config.get("uvicorn") or {})
    host, port = uv.pop("host", "127.0.0.1"), int(uv.pop("port", 8000))
    logging.basicConfig(level=log_level.upper())
    app = build_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uv)
