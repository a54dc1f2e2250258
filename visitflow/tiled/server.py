"""Run Tiled in-process with our request-context middleware around it.

Why not ``tiled serve config``: the access policy needs to know which key a create request
carries (see :mod:`.request_context`), and only the process that builds the app can wrap
it.  Building the app ourselves also skips a subprocess and a YAML round trip.  The same
goes for :class:`~.auth_gate.AuthGate`, which validates tokens asynchronously before Tiled's
synchronous ``decode_token`` sees them and re-checks websocket subscriptions, and for
:mod:`.principals` (cached principal lookups; websocket ``?access_token=`` fixed).
"""

from __future__ import annotations

import os
from typing import Any

from ..core.asgi_limits import DEFAULT_MAX_HEADER_BYTES, HeaderLimit
from . import principals
from .auth_gate import AuthGate
from .ops_endpoints import OpsEndpoints, readiness_checks
from .ws_deadline import FirstMessageDeadline
from .request_context import RequestContextMiddleware

__all__ = ['MAX_HEADER_ENV', 'build_app', 'serve']

#: request-header cap of ``visitflow tiled serve`` (bytes; default 16 KiB)
MAX_HEADER_ENV = "VISITFLOW_MAX_HEADER_BYTES"


def build_app(config: dict[str, Any]):
    """The Tiled ASGI app for a config dict (see :func:`.config.render_config`), wrapped."""
    from .tiled_compat import Config, build_app_from_config

    parsed = Config.model_validate(config)
    app = build_app_from_config(parsed)
    rows = getattr(getattr(app.state, "access_policy", None), "tag_rows", None)
    if rows is not None:  # the policy records node tags through the catalog's own session
        rows.catalog = getattr(app.state, "root_tree", None)
    principals.install(app)
    wrapped = RequestContextMiddleware(app)
    authenticators = list((parsed.authentication.authenticators or {}).values()) if parsed.authentication else []
    gate = next((a for a in authenticators if hasattr(a, "prevalidate")), None)
    app = AuthGate(wrapped, gate) if gate is not None else wrapped
    app = OpsEndpoints(app, readiness_checks(config))  # /healthz /readyz /metrics, no token
    # issue 20 finding 4, kept apart from AuthGate: a websocket's first-message deadline, and
    # a header cap checked before any token is looked at (visitflow/core/asgi_limits.py says
    # why a middleware and not uvicorn's h11 option)
    return HeaderLimit(FirstMessageDeadline(app), int(os.environ.get(MAX_HEADER_ENV, DEFAULT_MAX_HEADER_BYTES)))


def serve(config: dict[str, Any], *, log_level: str = "info", log_format: str | None = None) -> None:
    """Blocking: serve until SIGINT/SIGTERM."""
    import uvicorn

    uv = dict(config.get("uvicorn") or {})
    host, port = uv.pop("host", "127.0.0.1"), int(uv.pop("port", 8000))
    from ..core.jsonlog import configure_logging

    configure_logging(log_format, log_level)  # json: one object a line (core.jsonlog)
    app = build_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=None, **uv)
