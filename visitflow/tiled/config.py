"""Render the Tiled server configuration that wires in our authenticator and policy.

One function, :func:`render_config`, so ``visitflow tiled-config`` (print it),
``visitflow tiled serve`` (run it) and the test fixtures build the same server:

* catalog: SQLite file under the state directory, created if missing;
* ``writable_storage``: a directory for arrays (zarr) *and* a SQL tabular store — bluesky's
  ``TiledWriter`` writes event streams as appendable tables, which need a SQL storage
  (``sqlite:``/``duckdb:`` locally, ``postgresql:`` in production);
* authentication: one provider, :class:`~visitflow.tiled.authenticator.VisitflowAuthenticator`,
  no anonymous access (unless ``allow_anonymous``: anonymous requests then get in and are
  given no scopes by the policy — for pass-through clients, see :func:`render_config`);
* access control: :class:`~visitflow.tiled.access_policy.VisitflowAccessPolicy` with the
  path templates;
* a ``streaming_cache`` (tiled#437): Tiled publishes every append to websocket subscribers
  (``/api/v1/stream/single/<path>``), which is how live analyses follow a run by push
  (:mod:`visitflow.flow.push`).  ``memory`` for one process (the default), a
  ``redis://`` URI when several Tiled processes serve the same catalog (a subscriber on one
  process then sees appends made through another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from ..core.layout import DEFAULT_PROCESSED_TEMPLATE, DEFAULT_RAW_TEMPLATE, Layout
from ..core.scopes import ADMIN_SCOPE

__all__ = [
    'PROVIDER', 'render_config', 'streaming_cache_config', 'prepare_state_dir', 'to_yaml',
    'write_config',
]

PROVIDER = "visitflow"


def render_config(
    *,
    issuer: str,
    state_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    raw_template: Optional[str] = DEFAULT_RAW_TEMPLATE,
    processed_template: Optional[str] = DEFAULT_PROCESSED_TEMPLATE,
    audience: str = "tiled",
    admin_scope: str = ADMIN_SCOPE,
    tabular_storage: Optional[str] = None,
    catalog_uri: Optional[str] = None,
    authn_database_uri: Optional[str] = None,
    grant_register: bool = False,
    file_roots: Optional[dict[str, str]] = None,
    introspect_client_id: Optional[str] = None,
    cache_seconds: Optional[float] = None,
    allow_anonymous: bool = False,
    user_issuer: Optional[str] = None,
    authority: Optional[dict] = None,
    streaming_cache: Optional[str] = "memory",
    tls: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """A tiled config dict (``tiled serve config`` accepts it as YAML).

    ``tabular_storage`` defaults to a SQLite file (``sqlite:///<state>/tables.sqlite``).
    ``authn_database_uri`` is Tiled's principals table, which tiled reads *and commits to*
    on every request with an external token; it defaults to a SQLite file in the state
    directory.  Not tiled's in-memory default: with shared-cache in-memory SQLite,
    concurrent requests fail with "cannot commit transaction - SQL statements in progress"
    (500s, found by benchmarks/tiled_auth.py).  Use PostgreSQL for several Tiled processes.

    ``file_roots`` (e.g. ``{"raw": "/dls/i22/data/{year}/{visit}"}``) lets writers register
    detector files that lie in their visit's directory (see :mod:`.file_roots`): it turns
    on the ``register`` scope and makes the roots readable by Tiled.

    ``introspect_client_id`` (e.g. ``tiled``, secret in ``$VISITFLOW_TILED_CLIENT_SECRET``)
    turns on revocation checks; ``cache_seconds`` bounds how long a revoked token still works.

    ``allow_anonymous``: tell clients authentication is not *required*.  tiled[client] 0.2.18
    (blueapi 1.21.1's pin), given only a pass-through ``Authorization`` header, asks the server
    whether login is required and, if so, starts an interactive device login instead of
    sending the header.  With this on, anonymous requests get in and the access policy gives
    them nothing (no scopes, no visible nodes); a bad token is still a 401.

    ``user_issuer`` (the facility IdP) + ``authority`` (e.g. ``{kind: opa, url: ...}``): users'
    own tokens from that issuer are accepted and the authority decides their visit access
    (:mod:`.facility_users`); ``issuer`` is then the token service, whose run tokens' scopes decide.

    ``streaming_cache``: ``"memory"`` (default), a ``redis://host:port/db`` URI, or ``None``
    / ``""`` for no websocket stream (live analyses then poll).
    """
    from .file_roots import FileRoots

    layout = Layout.from_templates(raw_template or None, processed_template or None)  # validate early
    roots = FileRoots(file_roots, layout)
    state = Path(state_dir).resolve()
    data_dir = state / "data"
    return {
        "authentication": {
            "providers": [
                {
                    "provider": PROVIDER,
                    "authenticator": "visitflow.tiled.authenticator:VisitflowAuthenticator",
                    "args": {
                        "issuer": issuer.rstrip("/"),
                        "audience": audience,
                        "admin_scope": admin_scope,
                        "grant_register": bool(grant_register or roots),
                        **({"introspect_client_id": introspect_client_id} if introspect_client_id else {}),
                        **({"cache_seconds": float(cache_seconds)} if cache_seconds is not None else {}),
                        **({"user_issuer": user_issuer.rstrip("/")} if user_issuer else {}),
                    },
                }
            ],
            "allow_anonymous_access": bool(allow_anonymous),
        },
        "database": {
            "uri": authn_database_uri or f"sqlite:///{state / 'authn.sqlite'}",
            "init_if_not_exists": True,
        },
        "access_control": {
            "access_policy": "visitflow.tiled.access_policy:VisitflowAccessPolicy",
            "args": {
                "raw_template": raw_template or None,
                "processed_template": processed_template or None,
                "admin_scope": admin_scope,
                **({"file_roots": {r.store: r.template for r in roots.roots.values()}} if roots else {}),
                **({"authority": dict(authority)} if authority else {}),
            },
        },
        "catalog": {
            "uri": catalog_uri or f"sqlite:///{state / 'catalog.sqlite'}",
            "writable_storage": [
                str(data_dir),
                tabular_storage or f"sqlite:///{state / 'tables.sqlite'}",
            ],
            **({"readable_storage": roots.readable_storage()} if roots else {}),
            "init_if_not_exists": True,
        },
        **({"streaming_cache": streaming_cache_config(streaming_cache)} if streaming_cache else {}),
        # tls: {ssl_certfile, ssl_keyfile} (visitflow.core.tls.tls_files): Tiled's schema and
        # uvicorn take them as they are; serve() passes this section to uvicorn.run
        "uvicorn": {"host": host, "port": int(port), **(tls or {})},
    }


def streaming_cache_config(uri: str) -> dict[str, Any]:
    """Tiled's ``streaming_cache`` section for ``memory`` or a ``redis://`` URI.

    ``data_ttl``: how long a published append can be replayed to a (re)connecting
    subscriber; an hour covers a Tiled or network hiccup during a scan (older frames are
    read over HTTP anyway)."""
    if uri != "memory" and not uri.startswith(("redis://", "rediss://")):
        raise ValueError(f"streaming cache must be 'memory' or a redis:// URI, not {uri!r}")
    return {"uri": uri, "data_ttl": 3600}


def prepare_state_dir(state_dir: str | Path) -> Path:
    """Create the directories the config points at (tiled does not create ``data/``)."""
    state = Path(state_dir).resolve()
    (state / "data").mkdir(parents=True, exist_ok=True)
    return state


def to_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path
