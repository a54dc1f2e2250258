"""Readiness: a service names each dependency it needs and how to tell it answers.

``/healthz`` (liveness) says only that the process serves requests: a restart would not
help a dependency.  ``/readyz`` asks each dependency now (each check bounded by its own
timeout, all of them concurrently) and answers 200 only when all answer; otherwise 503 with
which one and why, so a load balancer stops sending traffic and an operator knows where to
look (docs/operations.md).  Used by the token service, Tiled and the worker.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import httpx

__all__ = ['Check', 'http_check', 'issuer_check', 'run_checks']


@dataclass(frozen=True)
class Check:
    """``probe()`` returns a short detail on success and raises (any exception) on failure."""

    name: str
    probe: Callable[[], Awaitable[str]]


def http_check(name: str, url: str, *, timeout: float = 3.0, expect_json_key: str | None = None) -> Check:
    """GET ``url``: ready if 2xx (and, if given, its JSON body has ``expect_json_key``)."""

    async def probe() -> str:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(url)
        if r.status_code >= 300:
            raise RuntimeError(f"{url} answered {r.status_code}")
        if expect_json_key is not None and expect_json_key not in r.json():
            raise RuntimeError(f"{url} has no {expect_json_key!r}")
        return f"{url} answered {r.status_code}"

    return Check(name, probe)


def issuer_check(name: str, issuer: str, *, timeout: float = 3.0) -> Check:
    """An OIDC issuer is usable: its discovery document answers and its JWKS holds keys (what
    every token check of the token service and of Tiled needs)."""

    async def probe() -> str:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(f"{issuer}/.well-known/openid-configuration")
            if r.status_code != 200:
                raise RuntimeError(f"discovery at {issuer} answered {r.status_code}")
            jwks_uri = r.json()["jwks_uri"]
            k = await client.get(jwks_uri)
            if k.status_code != 200 or not k.json().get("keys"):
                raise RuntimeError(f"JWKS at {jwks_uri} answered {k.status_code} with no keys")
        return f"discovery + JWKS of {issuer} ({len(k.json()['keys'])} keys)"

    return Check(name, probe)


async def run_checks(checks: list[Check], *, timeout: float = 5.0) -> tuple[bool, dict]:
    """(all ready, body): body ``{"status": "ready"|"not ready", "checks": {name: {ok, detail, seconds}}}``."""

    async def one(check: Check) -> tuple[str, dict]:
        start = time.monotonic()
        try:
            detail = await asyncio.wait_for(check.probe(), timeout)
            ok = True
        except asyncio.TimeoutError:
            ok, detail = False, f"no answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
        return check.name, {"ok": ok, "detail": detail, "seconds": round(time.monotonic() - start, 3)}

    results = dict(await asyncio.gather(*(one(c) for c in checks)))
    ready = all(r["ok"] for r in results.values())
    failing = sorted(n for n, r in results.items() if not r["ok"])
    body = {"status": "ready" if ready else "not ready", "checks": results}
    if failing:
        body["failing"] = failing
    return ready, body
