"""From a stored delegation grant (T_grant) to a refreshing data token (T_data) — the token
mechanics of docs/architecture.md §2 step 5, independent of Prefect so they can be tested
and reused.

1. Validate T_grant: signature (JWKS), issuer, expiry, ``aud=visitflow``.
2. Check it covers ``run:<analysis>:<visit>``, ``read:raw:<visit>/<run>`` and
   ``write:processed:<visit>/<run>`` — *before any data access*.
3. Exchange it (client ``visitflow``) for T_data: ``aud=tiled``, scope
   ``read:raw:<visit>/<run> write:processed:<visit>/<run>``, with a refresh token.
4. Keep T_data fresh: refresh before expiry; if refresh fails, re-exchange T_grant; if both
   are dead, :class:`DelegationExpired`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import jwt

from ..core import oauth
from ..errors import DelegationExpired, GrantInvalid, InvalidToken, NotAuthorised
from ..core.scopes import ScopeSet, data_token_scopes, grant_scopes
from ..core.tokens import Claims, TokenValidator, unverified_claims
from .. import errors

__all__ = [
    'GRANT_AUDIENCE', 'DATA_AUDIENCE', 'PER_RUN_HINT', 'check_grant', 'DataTokenSource',
]

GRANT_AUDIENCE = "visitflow"
DATA_AUDIENCE = "tiled"
#: Said when an IdP will not give run-specific scopes (Keycloak refuses them: invalid_scope).
PER_RUN_HINT = (" — this IdP cannot issue per-run scopes; set grant_scope='visit' on the block and "
                "the trigger (docs/production.md §3)")


def check_grant(validator: TokenValidator, grant: str, analysis: str, visit: str, run_id: str) -> Claims:
    """Steps 1–2: validate T_grant and check it covers exactly what this run needs."""
    try:
        claims = validator.validate(grant, audience=GRANT_AUDIENCE)
    except InvalidToken as exc:
        if exc.code == "expired":
            raise DelegationExpired(f"the delegation grant for {analysis} on {visit}/{run_id} has expired "
                                    "(re-trigger the analysis with a fresh login)") from exc
        raise GrantInvalid(f"the delegation grant for {analysis} on {visit}/{run_id} is not valid: "
                           f"{exc.reason}") from exc
    missing = claims.scopes.uncovered(grant_scopes(analysis, visit, run_id))
    if missing:
        raise NotAuthorised(
            f"the delegation grant (sub={claims.sub}) does not cover {' '.join(map(str, missing))}; "
            f"it carries {claims.scopes or 'no scopes'}")
    return claims


def _expired(token: str, now: float | None = None) -> bool:
    """True if ``token``'s ``exp`` has passed.  Unverified on purpose: the grant was verified by
    :func:`check_grant`; this only tells *why* the IdP refused it, whatever its wording."""
    try:
        exp = unverified_claims(token).get("exp")
    except jwt.PyJWTError:
        return False
    return isinstance(exp, (int, float)) and exp <= (time.time() if now is None else now)


@dataclass
class DataTokenSource:
    """Hands out a valid T_data; thread-safe (Tiled reads run in a thread pool).

    ``__call__`` returns ``(token, expires_at)``, the shape :class:`visitflow.core.tiled_client`
    bearer auth expects; ``force_refresh()`` is called after a 401.
    """

    token_url: str
    grant: str
    client_id: str
    client_secret: str
    visit: str
    run_id: str
    margin: float = 30.0
    per: str = "run"          # "visit" where the IdP cannot mint per-run scopes (scopes.GRANT_SCOPE_MODES)
    #: the analysis whose results the data token may write (None: the whole processed run, the
    #: pre-issue-20 data token; an old run-wide grant still narrows to one analysis)
    analysis: str | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._current: oauth.TokenResponse | None = None
        self.exchanges = 0
        self.refreshes = 0
        self._want_refresh = True  # until the IdP says it will not add a refresh token

    @property
    def scope(self) -> str:
        return str(data_token_scopes(self.visit, self.run_id, self.per, self.analysis))

    def _exchange(self) -> oauth.TokenResponse:
        try:
            resp = self._call_exchange()
        except errors.OAuthRefused as exc:
            if _expired(self.grant):  # decided by the grant's own exp, not the IdP's wording
                raise DelegationExpired(f"cannot renew data access for {self.visit}/{self.run_id}: the "
                                        "delegation grant has expired") from exc
            if exc.error in ("invalid_scope", "access_denied"):
                hint = PER_RUN_HINT if exc.error == "invalid_scope" and self.per == "run" else ""
                raise NotAuthorised(f"the IdP refused data access for {self.visit}/{self.run_id}: {exc}{hint}") from exc
            raise GrantInvalid(f"the IdP refused the delegation grant: {exc}") from exc
        self._check_granted(resp)
        self.exchanges += 1
        return resp

    def _call_exchange(self) -> oauth.TokenResponse:
        """Ask for a data token with a refresh token; if the IdP will not add one for this grant
        (Keycloak: ``invalid_request`` unless the grant itself came with a refresh token), ask
        for the access token alone from then on and re-exchange the grant when it expires."""
        kwargs = dict(client_id=self.client_id, client_secret=self.client_secret, audience=DATA_AUDIENCE,
                      scope=self.scope)
        if self._want_refresh:
            try:
                return oauth.exchange(self.token_url, self.grant, requested_token_type=oauth.REFRESH_TOKEN_TYPE,
                                      **kwargs)
            except errors.OAuthRefused as exc:
                if exc.error != "invalid_request":
                    raise
                self._want_refresh = False
        return oauth.exchange(self.token_url, self.grant, **kwargs)

    def _check_granted(self, resp: oauth.TokenResponse) -> None:
        """Some IdPs silently *drop* requested scopes they will not issue (Keycloak: a client
        scope the user lacks the role for) instead of refusing: catch that here, with the fix
        in the message, rather than as a 403 from Tiled half-way through an analysis."""
        granted = resp.scope
        if not granted:  # the response may omit scope (RFC 6749 §5.1): read the token's claim
            try:  # unverified on purpose: Tiled verifies; this only reads what was issued
                granted = unverified_claims(resp.access_token).get("scope", "")
            except jwt.PyJWTError:
                return  # an opaque token: nothing to check here, Tiled will decide
        missing = ScopeSet.lenient(granted).uncovered(data_token_scopes(self.visit, self.run_id, self.per, self.analysis))
        if missing:
            hint = PER_RUN_HINT if self.per == "run" else ""
            raise NotAuthorised(f"the IdP issued a data token for {self.visit}/{self.run_id} without "
                                f"{' '.join(map(str, missing))} (granted: {granted or 'nothing'}){hint}")

    def _renew(self) -> oauth.TokenResponse:
        cur = self._current
        if cur is not None and cur.refresh_token and (cur.refresh_expires_at or float("inf")) > time.time() + 1:
            try:
                resp = oauth.refresh(self.token_url, cur.refresh_token, client_id=self.client_id,
                                     client_secret=self.client_secret)
                self.refreshes += 1
                return resp
            except errors.OAuthRefused:
                pass  # refresh dead (session maximum, revoked): fall back to the grant
        return self._exchange()

    def __call__(self) -> tuple[str, float]:
        with self._lock:
            if self._current is None or self._current.expires_at - self.margin <= time.time():
                self._current = self._renew()
            return self._current.access_token, self._current.expires_at

    def force_refresh(self) -> tuple[str, float]:
        with self._lock:
            self._current = self._renew()
            return self._current.access_token, self._current.expires_at
