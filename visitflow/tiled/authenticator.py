"""Tiled authenticator: our JWT access tokens in, Tiled principal + scopes out.

Why a subclass of tiled's ``ProxiedOIDCAuthenticator`` and not a fresh class: tiled 0.2.20
only routes bearer tokens it did not mint itself to ``settings.authenticator``, and it sets
that only when the single configured provider *is* a ``ProxiedOIDCAuthenticator``.  So we
inherit the type and replace what it does:

* ``decode_token`` validates with :class:`visitflow.core.tokens.TokenValidator` (issuer,
  audience ``tiled``, RS256 only, ``typ``, required claims) and turns every failure into a
  **401 whose body says why**.  The stock implementation lets ``jwt`` errors for a wrong
  audience or an unknown ``kid`` escape as 500s.
* Tiled's own scopes (``read:metadata``, ``write:data``, ``create:node``...) are *derived*
  from ours; scope strings in the token that happen to be Tiled scope names are ignored.
  Our parsed scopes ride along in the same ``scope`` claim, so the access policy receives
  them as ``authn_scopes`` (Tiled only ever checks that required scopes are a subset).
* ``sub`` is rewritten to a stable UUID and the real subject moved to ``user``: tiled
  parses ``sub`` as a UUID hex for proxied tokens (``alice`` would be a 500) and takes the
  identity from ``user``.  Claims tiled would interpret (``sub_typ``, ``ids``, ``state``)
  are never passed through.
* ``authenticate`` (authorization-code login) is disabled: Tiled never mints sessions here.

``decode_token`` is synchronous and Tiled calls it on its event loop, so it must never wait
on the network.  :meth:`VisitflowAuthenticator.prevalidate` does the network parts
asynchronously *before* Tiled sees the request — an unknown ``kid`` awaits one rate-limited
JWKS refresh, introspection is one bounded, single-flight request per token — and caches the
outcome (accepted or refused); ``decode_token`` then only reads that cache.  The ASGI
:class:`~visitflow.tiled.auth_gate.AuthGate` that ``visitflow tiled serve`` wraps around
Tiled calls it for every HTTP request and websocket.  Without the gate (plain ``tiled
serve``) ``decode_token`` falls back to validating inline, blocking as before.  Signing keys
that merely age are refreshed in a background thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import uuid
from typing import Any, Iterable, Optional

import httpx
import jwt
from fastapi import HTTPException

from ..core import oauth
from . import facility_users, metrics
from .credentials import CREDENTIAL, UNSET
from .tiled_compat import ProxiedOIDCAuthenticator
from ..core.scopes import ADMIN_SCOPE, OpaqueScope, ScopeSet
from ..core.tokens import (ACCESS_TOKEN_TYPES, ALGORITHMS, Claims, TokenValidator, discover,
                           unverified_claims)
from ..errors import InvalidToken
from .. import errors

logger = logging.getLogger(__name__)


READ_SCOPES = frozenset({"read:metadata", "read:data"})
WRITE_SCOPES = frozenset({"write:metadata", "write:data", "create:node"})
#: Processed outputs get replaced (analyses rewrite results); raw data is never deleted
#: except by the admin.  The policy grants these only inside a processed run.
DELETE_SCOPES = frozenset({"delete:node", "delete:revision"})
#: What the admin step needs (create store roots / visit containers) plus housekeeping.
ADMIN_TILED_SCOPES = READ_SCOPES | WRITE_SCOPES | DELETE_SCOPES | frozenset({"register", "metrics"})


def derive_tiled_scopes(scopes: ScopeSet, *, admin_scope: str = ADMIN_SCOPE,
                        grant_register: bool = False) -> set[str]:
    """Tiled's coarse, per-request scopes implied by ours.

    They only open the door; which node may be read or written is the access policy's
    decision.  ``register`` (pointing nodes at existing files) is withheld unless the server
    has per-visit data directories (``file_roots``, which turn ``grant_register`` on): the
    policy then confines each registration to its visit's directory (:mod:`.file_roots`).
    Deleting is derived only from write scopes on the processed store.
    """
    out: set[str] = set()
    if scopes.covers(OpaqueScope(admin_scope)):
        return set(ADMIN_TILED_SCOPES)
    for s in scopes.data_scopes():
        out |= READ_SCOPES
        if s.action == "write":
            out |= WRITE_SCOPES
            if s.store in ("processed", "data"):
                out |= DELETE_SCOPES
            if grant_register:
                out.add("register")
    return out


def carried_scopes(scopes: ScopeSet, *, admin_scope: str = ADMIN_SCOPE) -> set[str]:
    """Our scopes that the access policy needs to see (data scopes and the admin scope)."""
    out = {str(s) for s in scopes.data_scopes()}
    if scopes.covers(OpaqueScope(admin_scope)):
        out.add(admin_scope)
    return out


def principal_uuid(issuer: str, sub: str) -> str:
    """A stable UUID (hex) for tiled's ``sub`` slot; never equal to a tiled-minted uuid4."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{issuer}#{sub}").hex


class BackgroundJWKSValidator(TokenValidator):
    """:class:`TokenValidator` whose signing keys never make the caller wait on the network.

    The JWKS is fetched at start and then in a daemon thread: when the cache is older than
    ``refresh_interval`` (stale keys keep working meanwhile) and when an unknown ``kid``
    arrives (rate-limited by ``min_refetch_interval``; the caller then waits at most
    ``unknown_kid_wait`` seconds for that refresh).  All claim checks are the parent's.
    """

    def __init__(self, issuer: str, audience: str | Iterable[str], *, refresh_interval: float = 300.0,
                 unknown_kid_wait: float = 1.0, fetch_timeout: float = 5.0, **kwargs):
        super().__init__(issuer, audience, **kwargs)
        self.refresh_interval = refresh_interval
        self.unknown_kid_wait = unknown_kid_wait
        self.fetch_timeout = fetch_timeout
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._attempted_at = 0.0
        self._state_lock = threading.Lock()
        self._inflight: threading.Event | None = None

    # -- key cache ---------------------------------------------------------------------
    def fetch_keys(self) -> None:
        """Fetch the JWKS now (blocking); keeps the old keys if the fetch fails."""
        try:
            resp = httpx.get(self.jwks_uri, timeout=self.fetch_timeout)
            resp.raise_for_status()
            self._install(resp.json())
        except Exception as exc:  # network, JSON, discovery: keep serving the cached keys
            logger.warning("could not refresh signing keys from %s: %s", self._jwks_uri, exc)

    def _install(self, jwks: dict) -> None:
        keys = {}
        for jwk in jwks.get("keys", []):
            if jwk.get("use", "sig") != "sig" or not jwk.get("kid"):
                continue
            try:
                keys[jwk["kid"]] = jwt.PyJWK(jwk)
            except jwt.PyJWTError as exc:  # an unusable key must not hide the others
                logger.warning("skipping JWKS key %s: %s", jwk.get("kid"), exc)
        self._keys = keys
        self._fetched_at = time.monotonic()

    def has_key(self, kid: str) -> bool:
        return kid in self._keys

    async def refresh_async(self, client: httpx.AsyncClient) -> None:
        """One JWKS fetch on the event loop, bounded by ``fetch_timeout`` and rate-limited by
        ``min_refetch_interval`` (shared with the background refresh); keeps the old keys on
        failure."""
        with self._state_lock:
            if self._inflight is not None or time.monotonic() - self._attempted_at < self._min_refetch:
                return
            self._attempted_at = time.monotonic()
        try:
            resp = await client.get(self.jwks_uri, timeout=self.fetch_timeout)
            resp.raise_for_status()
            self._install(resp.json())
        except Exception as exc:  # noqa: BLE001 - keep serving the cached keys
            logger.warning("could not refresh signing keys from %s: %s", self._jwks_uri, exc)

    def _refresh_in_background(self) -> threading.Event | None:
        """Start a refresh unless one is running or one was attempted within the cooldown.

        Returns the Event of the running refresh (new or existing), or None if rate-limited.
        """
        with self._state_lock:
            if self._inflight is not None:
                return self._inflight
            if time.monotonic() - self._attempted_at < self._min_refetch:
                return None
            self._attempted_at = time.monotonic()
            done = self._inflight = threading.Event()

        def run():
            try:
                self.fetch_keys()
            finally:
                with self._state_lock:
                    self._inflight = None
                done.set()

        threading.Thread(target=run, name="visitflow-jwks", daemon=True).start()
        return done

    def _signing_key(self, kid: str):
        key = self._keys.get(kid)
        if key is not None:
            if time.monotonic() - self._fetched_at > self.refresh_interval:
                self._refresh_in_background()
            return key
        done = self._refresh_in_background()
        if done is not None and done.wait(self.unknown_kid_wait):
            key = self._keys.get(kid)
            if key is not None:
                return key
        raise InvalidToken(f"unknown signing key id {kid!r}")


def _issuer_of(token: str) -> Optional[str]:
    """``iss`` read unverified, only to pick the validator that then verifies the token."""
    try:
        iss = unverified_claims(token).get("iss")
    except Exception:  # noqa: BLE001 - garbage goes to the main validator, which says why
        return None
    return iss.rstrip("/") if isinstance(iss, str) else None


def _www_authenticate(reason: str, error: str = "invalid_token") -> str:
    safe = reason.replace("\\", "").replace('"', "'")
    return f'Bearer error="{error}", error_description="{safe}"'


class VisitflowAuthenticator(ProxiedOIDCAuthenticator):
    """Accept visitflow access tokens (``aud`` ``tiled``) as Tiled bearer tokens.

    Config (tiled ``authentication.providers[].args``): ``issuer`` (required),
    ``audience`` (default ``tiled``), ``client_id``, ``device_flow_client_id``,
    ``leeway``, ``admin_scope``, ``grant_register``, ``jwks_refresh_interval``,
    ``discovery_timeout`` (how long to wait for the IdP at server start),
    ``cache_seconds`` (how long a validated token is remembered, capped by its exp),
    ``introspect_client_id`` + ``introspect_secret_env`` (turn on revocation checks: each
    token is also introspected at the IdP, RFC 7662, when it enters the cache — so a revoked
    token is refused within ``cache_seconds`` instead of living to its expiry; fails closed
    with a 503 if the IdP cannot answer).
    """

    configuration_schema = """
$schema": http://json-schema.org/draft-07/schema#
type: object
additionalProperties: false
properties:
  issuer: {type: string}
  audience: {type: string}
  client_id: {type: string}
  device_flow_client_id: {type: string}
  leeway: {type: number}
  admin_scope: {type: string}
  grant_register: {type: boolean}
  jwks_refresh_interval: {type: number}
  discovery_timeout: {type: number}
  cache_seconds: {type: number}
  confirmation_message: {type: string}
  introspect_client_id: {type: string}
  introspect_secret_env: {type: string}
  user_issuer: {type: string}
  user_audience: {type: string}
"""

    def __init__(
        self,
        issuer: str,
        audience: str = "tiled",
        client_id: str = "tiled",
        device_flow_client_id: str = "visitflow-cli",
        leeway: float = 10.0,
        admin_scope: str = ADMIN_SCOPE,
        grant_register: bool = False,
        jwks_refresh_interval: float = 300.0,
        discovery_timeout: float = 60.0,
        cache_seconds: float = 30.0,
        confirmation_message: str = "",
        introspect_client_id: Optional[str] = None,
        introspect_secret_env: str = "VISITFLOW_TILED_CLIENT_SECRET",
        user_issuer: Optional[str] = None,
        user_audience: str = "tiled",
    ):
        self._issuer = issuer.rstrip("/")
        self._discovery_timeout = discovery_timeout
        self.admin_scope = admin_scope
        self.grant_register = grant_register
        self.cache_seconds = cache_seconds
        #: token -> (valid until, decoded dict or the HTTPException refusing it)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._aclient: Optional[httpx.AsyncClient] = None
        self._introspect_slots: Optional[asyncio.Semaphore] = None
        self.max_concurrent_introspections = 16
        self.gated = False  # set by AuthGate: every request was prevalidated
        # The parent's __init__ reads the discovery document (authorization endpoint etc.).
        super().__init__(
            audience=audience,
            client_id=client_id,
            well_known_uri=f"{self._issuer}/.well-known/openid-configuration",
            device_flow_client_id=device_flow_client_id,
            confirmation_message=confirmation_message,
        )
        self.validator = BackgroundJWKSValidator(
            self._issuer,
            audience,
            jwks_uri=self._config_from_oidc_url["jwks_uri"],
            leeway=leeway,
            accepted_types=ACCESS_TOKEN_TYPES,
            refresh_interval=jwks_refresh_interval,
        )
        self.validator.fetch_keys()
        self._introspection: Optional[tuple[str, str, str]] = None
        if introspect_client_id:
            secret = os.environ.get(introspect_secret_env)
            endpoint = self._config_from_oidc_url.get("introspection_endpoint")
            if not secret or not endpoint:
                raise RuntimeError(
                    f"revocation checks need the IdP's introspection_endpoint ({endpoint or 'none advertised'}) "
                    f"and the {introspect_client_id} client secret in ${introspect_secret_env}")
            self._introspection = (endpoint, introspect_client_id, secret)
            self._introspect_client = httpx.Client(timeout=5.0)
        # Production: users' own tokens from the facility IdP (see facility_users).
        self.user_validator: Optional[BackgroundJWKSValidator] = None
        if user_issuer:
            self.user_validator = BackgroundJWKSValidator(
                user_issuer.rstrip("/"), user_audience, leeway=leeway, accepted_types=ACCESS_TOKEN_TYPES,
                refresh_interval=jwks_refresh_interval)
            self.user_validator.fetch_keys()

    @functools.cached_property
    def _config_from_oidc_url(self) -> dict[str, Any]:
        """Discovery, retried until ``discovery_timeout``: the IdP may start after Tiled."""
        deadline = time.monotonic() + self._discovery_timeout
        while True:
            try:
                return discover(self._issuer, timeout=5.0)
            except (httpx.HTTPError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"OIDC discovery at {self._issuer} failed: {exc}") from exc
                time.sleep(0.5)

    @property
    def issuer(self) -> str:  # the parent caches it from discovery; ours is configured
        return self._issuer

    @property
    def end_session_endpoint(self) -> str:
        """Tiled's about document requires a logout link; our dev IdP has no end-session
        endpoint, so point at token revocation."""
        doc = self._config_from_oidc_url
        return doc.get("end_session_endpoint") or doc.get("revocation_endpoint") or f"{self._issuer}/logout"

    async def authenticate(self, request) -> Optional[Any]:
        """No authorization-code login into Tiled: clients bring their own tokens."""
        return None

    def claims_for_tiled(self, claims: Claims) -> dict[str, Any]:
        """The decoded-token dict tiled consumes (see module docstring for why each key)."""
        scopes = claims.scopes
        tiled = derive_tiled_scopes(scopes, admin_scope=self.admin_scope, grant_register=self.grant_register)
        ours = carried_scopes(scopes, admin_scope=self.admin_scope)
        raw = claims.raw
        out = {
            "sub": principal_uuid(self._issuer, claims.sub),
            "user": claims.sub,
            "scope": " ".join(sorted(tiled | ours)),
            "iss": raw.get("iss"),
            "exp": raw.get("exp"),
            "iat": raw.get("iat"),
        }
        for k in ("azp", "act", "jti"):
            if k in raw:
                out[k] = raw[k]
        return out

    def decode_token(self, id_token: str, access_token: Optional[str] = None) -> dict[str, Any]:
        # Tiled decodes the bearer token twice per request (principal and scopes are
        # separate dependencies), so a validated token is remembered briefly: until its exp
        # and at most ``cache_seconds``, which bounds how long a JWKS key removal lags.
        chosen = CREDENTIAL.get()
        if chosen is not UNSET and chosen != id_token:
            # Not the credential the gate read (and will re-check): never authorise with it.
            reason = "this token is not the request's credential (send exactly one)"
            raise HTTPException(status_code=401, detail=reason,
                                headers={"WWW-Authenticate": _www_authenticate(reason)})
        hit = self._cached(id_token)
        if hit is not None:
            if isinstance(hit, HTTPException):
                raise hit
            return dict(hit)
        if self.gated:
            logger.warning("a bearer token reached decode_token without prevalidation: validating inline")
        out = self._decode(id_token)
        self._remember(id_token, out)
        return dict(out)

    def _cached(self, token: str):
        hit = self._cache.get(token)
        if hit is not None and time.time() < hit[0]:
            return hit[1]
        return None

    def _remember(self, token: str, result) -> None:
        now = time.time()
        if isinstance(result, HTTPException):
            # A refusal is remembered briefly (a retry storm with a bad token costs nothing);
            # "IdP cannot answer" (503) only for a second: the IdP may be back.
            until = now + (1.0 if result.status_code >= 500 else min(5.0, self.cache_seconds))
        else:
            until = min(float(result["exp"]), now + self.cache_seconds)
        metrics.DECISIONS.labels("accepted" if not isinstance(result, HTTPException) else
                                 "unavailable" if result.status_code >= 500 else "refused").inc()
        if len(self._cache) >= 4096:
            for key in [k for k, (t, _) in self._cache.items() if t <= now] or list(self._cache)[:1024]:
                self._cache.pop(key, None)
        self._cache[token] = (until, result)

    async def prevalidate(self, token: str) -> None:
        """Validate ``token`` off the blocking path and cache the outcome for ``decode_token``.

        Never raises for a bad token (Tiled then refuses it, with our reason, from the
        cache).  Concurrent requests with the same new token share one validation."""
        if self._cached(token) is not None:
            metrics.CACHE.labels("true").inc()
            return
        metrics.CACHE.labels("false").inc()
        pending = self._pending.get(token)
        if pending is None:
            pending = self._pending[token] = asyncio.ensure_future(self._prevalidate(token))
            pending.add_done_callback(lambda _f: self._pending.pop(token, None))
        await asyncio.shield(pending)

    async def _prevalidate(self, token: str) -> None:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(timeout=5.0)
            self._introspect_slots = asyncio.Semaphore(self.max_concurrent_introspections)
        if self.user_validator is not None and _issuer_of(token) == self.user_validator.issuer:
            try:  # facility users' tokens: their own path (see _decode_user), unchanged
                self._remember(token, self._decode(token))
            except HTTPException as refusal:
                self._remember(token, refusal)
            return
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            header = {}
        kid = header.get("kid")
        # Only a token we could ever accept may make us refetch the JWKS: an HS512 Keycloak
        # refresh token (or alg none) is refused below by its algorithm, with that reason.
        if header.get("alg") in ALGORITHMS and isinstance(kid, str) and not self.validator.has_key(kid):
            await self.validator.refresh_async(self._aclient)  # key rotation reaches us here
            if not self.validator.has_key(kid):
                reason = f"unknown signing key id {kid!r}"
                self._remember(token, HTTPException(status_code=401, detail=reason,
                                                    headers={"WWW-Authenticate": _www_authenticate(reason)}))
                return
        try:
            out = self._decode(token, introspect=False)
            if self._introspection is not None:
                async with self._introspect_slots:
                    await self._check_active_async(token)
        except HTTPException as refusal:
            self._remember(token, refusal)
            return
        self._remember(token, out)

    def _decode(self, id_token: str, introspect: bool = True) -> dict[str, Any]:
        if self.user_validator is not None and _issuer_of(id_token) == self.user_validator.issuer:
            return self._decode_user(id_token)
        try:
            claims = self.validator.validate(id_token)
        except InvalidToken as exc:
            raise HTTPException(status_code=401, detail=exc.reason,
                                headers={"WWW-Authenticate": _www_authenticate(exc.reason)})
        except jwt.PyJWTError as exc:  # e.g. a non-string kid, which tokens.py does not map
            reason = f"invalid token: {exc}"
            raise HTTPException(status_code=401, detail=reason,
                                headers={"WWW-Authenticate": _www_authenticate(reason)})
        except Exception:  # a bug or an odd token must still be a 401, not a 500
            logger.exception("unexpected error validating a bearer token")
            reason = "token could not be validated"
            raise HTTPException(status_code=401, detail=reason,
                                headers={"WWW-Authenticate": _www_authenticate(reason)})
        if introspect and self._introspection is not None:
            self._check_active(id_token)
        return self.claims_for_tiled(claims)

    def _decode_user(self, id_token: str) -> dict[str, Any]:
        """A facility user's token: identity only; the access policy asks the authority."""
        try:
            claims = self.user_validator.validate(id_token)
        except InvalidToken as exc:
            raise HTTPException(status_code=401, detail=exc.reason,
                                headers={"WWW-Authenticate": _www_authenticate(exc.reason)})
        return facility_users.claims_for_tiled(claims, principal_uuid(self.user_validator.issuer, claims.sub))

    def _check_active(self, token: str) -> None:
        """RFC 7662 at the IdP: refuse a token that was revoked (or whose session was)."""
        endpoint, client_id, secret = self._introspection
        try:
            answer = oauth.introspect(endpoint, token, client_id=client_id, client_secret=secret,
                                      client=self._introspect_client)
        except (errors.OAuthUnavailable, errors.OAuthRefused, ValueError) as exc:
            raise self._introspection_failed(exc)
        self._refuse_inactive(answer)

    async def _check_active_async(self, token: str) -> None:
        endpoint, client_id, secret = self._introspection
        start = time.monotonic()
        try:
            answer = await oauth.introspect_async(endpoint, token, client_id=client_id, client_secret=secret,
                                                  client=self._aclient)
        except (errors.OAuthUnavailable, errors.OAuthRefused, ValueError) as exc:
            raise self._introspection_failed(exc)
        finally:
            metrics.INTROSPECTION_SECONDS.observe(time.monotonic() - start)
        self._refuse_inactive(answer)

    @staticmethod
    def _introspection_failed(exc: Exception) -> HTTPException:
        logger.warning("token introspection failed: %s", exc)
        # Fail closed, but say it is the IdP, not the token: clients should retry later.
        return HTTPException(status_code=503, detail=f"cannot confirm the token is still active: {exc}")

    @staticmethod
    def _refuse_inactive(answer: dict) -> None:
        if not answer.get("active"):
            reason = "token is no longer active (revoked at the IdP)"
            raise HTTPException(status_code=401, detail=reason,
                                headers={"WWW-Authenticate": _www_authenticate(reason)})


__all__ = [
    "ADMIN_SCOPE", "VisitflowAuthenticator", "BackgroundJWKSValidator", "derive_tiled_scopes",
    "carried_scopes", "principal_uuid",
]
