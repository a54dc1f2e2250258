"""How Tiled turns a validated external token into its ``Principal`` — cached, and right on
websockets too.  Installed by ``visitflow tiled serve`` through FastAPI's
``dependency_overrides`` (tiled's own plugin point for its dependencies; the dependencies
themselves are Tiled internals, imported from :mod:`.tiled_compat`).

Why: for every request with a proxied-OIDC token tiled 0.2.20 looks the identity up in its
principals database *and commits* (``latest_login``) — three SELECTs and a write per GET,
most of what a JWT request costs over an API-key request (benchmarks/, P6).  The principal's
UUID never changes for an identity, so :class:`PrincipalCache` remembers it for
``ttl`` seconds (``latest_login`` is then refreshed at most that often).  Nothing about
*access* is cached here: the token is still validated per request (authenticator cache) and
the access policy decides from its scopes.

And: with such a token in ``?access_token=``, tiled's websocket principal dependency reads
``session.principal`` off what is already a principal and answers 500; the websocket
override resolves it the same way as HTTP.

(Module-level imports: FastAPI resolves the string annotations of ``from __future__ import
annotations`` against this module's globals.)
"""

from __future__ import annotations

import time
from typing import Optional

from fastapi import Depends, Query, Request, WebSocket
from fastapi.security import SecurityScopes

from .tiled_compat import (
    Identity,
    Principal,
    PrincipalType,
    get_api_key,
    get_api_key_websocket,
    get_current_principal,
    get_current_principal_websocket,
    get_database_session_factory,
    get_decoded_access_token,
    get_decoded_access_token_websocket,
    get_or_create_principal,
    get_settings,
    move_api_key,
    oauth2_scheme,
)

__all__ = ['PrincipalCache', 'install']


def _external(api_key, decoded) -> bool:
    """A token from our authenticator (not an API key, not a Tiled-minted session token)."""
    return api_key is None and decoded is not None and "sub_typ" not in decoded


class PrincipalCache:
    def __init__(self, ttl: float = 60.0, max_entries: int = 10000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._uuids: dict[tuple[str, str], tuple[float, object]] = {}

    async def principal(self, db_factory, provider: str, decoded: dict, access_token: Optional[str]):
        identity = decoded.get("user") or decoded["sub"]
        key = (provider, identity)
        hit = self._uuids.get(key)
        now = time.monotonic()
        if hit is None or hit[0] < now:
            found = await _get_or_create(db_factory, provider, identity)
            if len(self._uuids) >= self.max_entries:
                self._uuids.clear()
            hit = self._uuids[key] = (now + self.ttl, found.uuid)
        return Principal(uuid=hit[1], type=PrincipalType.user,
                         identities=[Identity(id=identity, provider=provider)], access_token=access_token)


async def _get_or_create(db_factory, provider: str, identity: str):
    """Tiled's ``get_or_create_principal``, once more in a new session if a concurrent request
    created the same identity first: on PostgreSQL two first requests of one user (two scans
    started together) race on ``identities_pkey`` and the loser's unique violation was a 500
    (tests/tiled/test_tiled_postgres.py).  The retry finds the winner's row."""
    from sqlalchemy.exc import IntegrityError

    try:
        async with db_factory() as db:
            return await get_or_create_principal(db, provider, identity)
    except IntegrityError:
        async with db_factory() as db:
            return await get_or_create_principal(db, provider, identity)


def install(app, ttl: float = 60.0) -> PrincipalCache:
    cache = PrincipalCache(ttl)

    async def principal_http(
        request: Request,
        security_scopes: SecurityScopes,
        access_token: str = Depends(oauth2_scheme),
        decoded_access_token=Depends(get_decoded_access_token),
        api_key=Depends(get_api_key),
        settings=Depends(get_settings),
        db_factory=Depends(get_database_session_factory),
        _=Depends(move_api_key),
    ):
        if _external(api_key, decoded_access_token):
            principal = await cache.principal(db_factory, request.app.state.provider, decoded_access_token,
                                              access_token)
            request.state.principal = principal  # tiled's request log reads it
            return principal
        return await get_current_principal(request, security_scopes, access_token, decoded_access_token, api_key,
                                           settings, db_factory, _)

    async def principal_websocket(
        websocket: WebSocket,
        api_key: Optional[str] = Depends(get_api_key_websocket),
        access_token: Optional[str] = Query(None),
        decoded_access_token: Optional[dict] = Depends(get_decoded_access_token_websocket),
        settings=Depends(get_settings),
        db_factory=Depends(get_database_session_factory),
    ):
        if _external(api_key, decoded_access_token):
            return await cache.principal(db_factory, websocket.app.state.provider, decoded_access_token,
                                         access_token)
        return await get_current_principal_websocket(websocket, api_key, access_token, decoded_access_token,
                                                     settings, db_factory)

    app.dependency_overrides[get_current_principal] = principal_http
    app.dependency_overrides[get_current_principal_websocket] = principal_websocket
    return cache
