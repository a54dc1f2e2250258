"""What the token service's ``/readyz`` asks (:mod:`visitflow.core.readiness`).

* ``facility-idp:<issuer>`` — each trusted issuer's discovery document and JWKS (production):
  without them no facility token can be verified, so no T_grant can be minted.
* ``authority`` — OPA's own ``/health`` (production, ``authority.kind: opa``): without it
  every exchange is a 503 ``temporarily_unavailable``.
* ``state`` — the state directory (signing keys, revocation log) is there and writable
  (the token service's database today): a revocation that cannot be recorded must not be
  accepted as done.
* ``signing-key`` — a current signing key is loaded.

The dev IdP (no federation) has only the last two.
"""

from __future__ import annotations

import os
import tempfile

import httpx

from ..core.readiness import Check

__all__ = ['readiness_checks']


def _issuer_check(issuer: str, timeout: float) -> Check:
    async def probe() -> str:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(f"{issuer}/.well-known/openid-configuration")
            if r.status_code != 200:
                raise RuntimeError(f"discovery at {issuer} answered {r.status_code}")
            jwks_uri = r.json()["jwks_uri"]
            k = await client.get(jwks_uri)
            if k.status_code != 200 or not k.json().get("keys"):
                raise RuntimeError(f"JWKS at {jwks_uri} answered {k.status_code} with no keys")
        return f"discovery + JWKS ({len(k.json()['keys'])} keys)"

    return Check(f"facility-idp:{issuer}", probe)


def _opa_check(url: str, timeout: float) -> Check:
    async def probe() -> str:
        async with httpx.AsyncClient(timeout=timeout) as client:
            r = await client.get(f"{url}/health")
        if r.status_code != 200:
            raise RuntimeError(f"OPA at {url} answered {r.status_code}")
        return f"OPA at {url} healthy"

    return Check("authority", probe)


def _state_check(directory) -> Check:
    async def probe() -> str:
        if directory is None:
            return "in memory (dev: nothing survives a restart)"
        if not os.path.isdir(directory):
            raise RuntimeError(f"state directory {directory} is missing")
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-"):
            pass
        return f"{directory} writable"

    return Check("state", probe)


def _key_check(keys) -> Check:
    async def probe() -> str:
        return f"signing key {keys.current.kid}"

    return Check("signing-key", probe)


def readiness_checks(idp, *, timeout: float = 3.0) -> list[Check]:
    """The checks for one :class:`~.server.IdP`."""
    checks = []
    federation = idp.federation
    if federation is not None:
        checks += [_issuer_check(iss, timeout) for iss in federation.issuers]
        url = getattr(federation.authority, "url", None)
        if url:
            checks.append(_opa_check(url, timeout))
    path = idp.revocations.path
    checks += [_state_check(path.parent if path is not None else None), _key_check(idp.keys)]
    return checks
