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

import os
from typing import Any

from ..core.asgi_limits import DEFAULT_MAX_HEADER_BYTES, HeaderLimit
from . import principals
from .auth_gate import AuthGate
from .ops_endpoints import OpsEndpoints, readiness_checks
from .ws_deadline import FirstMessageDeadline
from .request_context import RequestContextMiddleware
from .routes import ClosedRoutes, close_routes

__all__ = ['MAX_HEADER_ENV', 'build_app', 'load_config', 'initialize_authn_database', 'serve', 'serve_file']

#: request-header cap of ``visitflow tiled serve`` (bytes; default 16 KiB)
MAX_HEADER_ENV = "VISITFLOW_MAX_HEADER_BYTES"


def build_app(config: dict[str, Any]):
    """The Tiled ASGI app for a config dict (see :func:`.config.render_config`), wrapped."""
    from . import reconnect, sql_storage
    from .tiled_compat import Config, build_app_from_config

    sql_storage.install()
    reconnect.install_storage_ping()   # Tiled's pools outlive a PostgreSQL restart (.reconnect)
    parsed = Config.model_validate(config)
    app = build_app_from_config(parsed)
    reconnect.ping_catalog(getattr(app.state, "root_tree", None))
    policy = getattr(app.state, "access_policy", None)
    for part in ("tag_rows", "frozen_runs", "live_nodes"):   # the policy reads/writes through the catalog
        holder = getattr(policy, part, None)
        if holder is not None:
            holder.catalog = getattr(app.state, "root_tree", None)
    principals.install(app)
    close_routes(app)   # GraphQL: not covered by the access policy (see .routes)
    wrapped = ClosedRoutes(RequestContextMiddleware(app))
    authenticators = list((parsed.authentication.authenticators or {}).values()) if parsed.authentication else []
    gate = next((a for a in authenticators if hasattr(a, "prevalidate")), None)
    app = AuthGate(wrapped, gate) if gate is not None else wrapped
    app = OpsEndpoints(app, readiness_checks(config))  # /healthz /readyz /metrics, no token
    # issue 20 finding 4, kept apart from AuthGate: a websocket's first-message deadline, and
    # a header cap checked before any token is looked at (visitflow/core/asgi_limits.py says
    # why a middleware and not uvicorn's h11 option)
    return HeaderLimit(FirstMessageDeadline(app), int(os.environ.get(MAX_HEADER_ENV, DEFAULT_MAX_HEADER_BYTES)))


def load_config(path) -> dict[str, Any]:
    """A Tiled config file as the dict :func:`build_app` takes.

    Through Tiled's own reader (``tiled.config.parse``: YAML, ``${VAR}`` expanded from the
    environment, so a site keeps database passwords out of the file as with ``tiled serve
    config``); :func:`build_app` validates it with Tiled's ``Config``."""
    from pathlib import Path

    from .tiled_compat import parse_config_file

    return parse_config_file(Path(path))


def serve_file(path, *, log_level: str = "info", log_format: str | None = None) -> None:
    """``visitflow tiled serve --config FILE``: like ``tiled serve config FILE``, but wrapped."""
    serve(load_config(path), log_level=log_level, log_format=log_format)


def initialize_authn_database(config: dict[str, Any]) -> None:
    """Create Tiled's principals tables in a PostgreSQL ``database.uri`` before the server starts.

    Tiled 0.2.20 does this itself at start-up (``init_if_not_exists``) by running ``tiled
    admin initialize-database str(engine.url)`` — and SQLAlchemy's ``str(URL)`` masks the
    password as ``***``, so on any password-protected PostgreSQL the start fails
    (CalledProcessError; seen by tests/tiled/test_tiled_postgres.py).  We run the same public
    command with the real URI first; "already initialized" is fine.  SQLite needs nothing."""
    import subprocess
    import sys

    from ..errors import ConfigError

    db = config.get("database") or {}
    uri = str(db.get("uri") or "")
    if not uri or uri.startswith("sqlite") or not db.get("init_if_not_exists"):
        return
    done = subprocess.run([sys.executable, "-m", "tiled", "admin", "initialize-database", uri],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "already initialized" not in done.stdout + done.stderr:
        raise ConfigError(f"Tiled's authentication database could not be initialized: {done.stderr[-500:]}")


def serve(config: dict[str, Any], *, log_level: str = "info", log_format: str | None = None) -> None:
    """Blocking: serve until SIGINT/SIGTERM."""
    import uvicorn

    uv = dict(config.get("uvicorn") or {})
    host, port = uv.pop("host", "127.0.0.1"), int(uv.pop("port", 8000))
    from ..core.jsonlog import configure_logging

    configure_logging(log_format, log_level)  # json: one object a line (core.jsonlog)
    initialize_authn_database(config)
    app = build_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=None, **uv)
