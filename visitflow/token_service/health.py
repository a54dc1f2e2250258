"""What the token service's ``/readyz`` asks (:mod:`visitflow.core.readiness`).

* ``facility-idp:<issuer>`` — each trusted issuer's discovery document and JWKS (production):
  without them no facility token can be verified, so no T_grant can be minted.
* ``authority`` — OPA's own ``/health`` (production, ``authority.kind: opa``): without it
  every exchange is a 503 ``temporarily_unavailable``.
* ``state`` — the state directory (signing keys, revocation log) is there and writable,
  or (``state.kind: postgres``, :mod:`.pg_state`) the shared database answers a query: a
  revocation that cannot be recorded must not be accepted as done.
* ``signing-key`` — a current signing key is loaded.

The dev IdP (no federation) has only the last two.
"""

from __future__ import annotations

import os
import tempfile

from ..core.readiness import Check, http_check, issuer_check

__all__ = ['readiness_checks']


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


def _database_check(db) -> Check:
    async def probe() -> str:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(db.probe)

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
        checks += [issuer_check(f"facility-idp:{iss}", iss, timeout=timeout) for iss in federation.issuers]
        url = getattr(federation.authority, "url", None)
        if url:
            checks.append(http_check("authority", f"{url}/health", timeout=timeout))
    if hasattr(idp.revocations, "probe"):
        checks += [_database_check(idp.revocations), _key_check(idp.keys)]
        return checks
    path = idp.revocations.path
    checks += [_state_check(path.parent if path is not None else None), _key_check(idp.keys)]
    return checks
