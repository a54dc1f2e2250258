"""``/healthz``, ``/readyz`` and ``/metrics`` on a Tiled server with visitflow's plug-ins.

Tiled 0.2.20 has an undocumented ``/healthz`` that says only that the app answers; a
readiness probe must also know that what every request needs is there.  This pure-ASGI
wrapper (outermost, so no authentication applies: probes carry no token, and these paths
reveal no data) answers:

* ``/healthz`` — liveness: the process serves.
* ``/readyz`` — :func:`readiness_checks`: the catalog and principals databases answer
  ``SELECT 1``; the token service's discovery + JWKS (run tokens); the facility IdP's
  (users' tokens), and OPA's ``/health`` when an authority is configured.  503 with which
  and why otherwise (:mod:`visitflow.core.readiness`).
* ``/metrics`` — :mod:`.metrics`.

Everything else goes to Tiled unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.readiness import Check, http_check, issuer_check, run_checks
from . import metrics

__all__ = ['readiness_checks', 'OpsEndpoints']


def _async_uri(uri: str) -> str:
    for plain, driver in (("sqlite://", "sqlite+aiosqlite://"), ("postgresql://", "postgresql+asyncpg://")):
        if uri.startswith(plain):
            return driver + uri[len(plain):]
    return uri


def _database_check(name: str, uri: str) -> Check:
    engine_box: dict = {}

    async def probe() -> str:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        if "engine" not in engine_box:
            engine_box["engine"] = create_async_engine(_async_uri(uri))
        async with engine_box["engine"].connect() as conn:
            await conn.execute(text("SELECT 1"))
        return f"{uri.split(':', 1)[0]} answers SELECT 1"

    return Check(name, probe)


def readiness_checks(config: dict[str, Any]) -> list[Check]:
    """The checks for a rendered Tiled config (:func:`visitflow.tiled.config.render_config`)."""
    checks = []
    if (config.get("catalog") or {}).get("uri"):
        checks.append(_database_check("catalog-database", config["catalog"]["uri"]))
    if (config.get("database") or {}).get("uri"):
        checks.append(_database_check("principals-database", config["database"]["uri"]))
    for provider in (config.get("authentication") or {}).get("providers") or []:
        args = provider.get("args") or {}
        if args.get("issuer"):
            checks.append(issuer_check("token-service", args["issuer"].rstrip("/")))
        if args.get("user_issuer"):
            checks.append(issuer_check("facility-idp", args["user_issuer"].rstrip("/")))
    authority = ((config.get("access_control") or {}).get("args") or {}).get("authority") or {}
    if authority.get("kind") == "opa" and authority.get("url"):
        checks.append(http_check("authority", authority["url"].rstrip("/") + "/health"))
    return checks


class OpsEndpoints:
    def __init__(self, app, checks: list[Check]):
        self.app, self.checks = app, checks
        metrics.install()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else None
        if path == "/healthz":
            return await self._send(send, 200, json.dumps({"status": "ok"}).encode(), "application/json")
        if path == "/readyz":
            ready, body = await run_checks(self.checks)
            return await self._send(send, 200 if ready else 503, json.dumps(body).encode(), "application/json")
        if path == "/metrics":
            payload, content_type = metrics.exposition()
            return await self._send(send, 200, payload, content_type)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _send(send, status: int, body: bytes, content_type: str) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()), (b"cache-control", b"no-store"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
