"""The dev IdP: a small, real OAuth 2 / OIDC token service shaped like Keycloak.

Endpoints: OIDC discovery, JWKS, ``/token`` (``password`` [dev only], ``client_credentials``,
``refresh_token``, RFC 8693 token exchange), RFC 7662 ``/introspect``, RFC 7009 ``/revoke``,
``/userinfo``.  Tokens are RS256 JWTs (pyjwt) with ``typ: at+jwt`` (RFC 9068).

Token exchange follows Keycloak's "standard token exchange" (V2) rules:
the requesting client must be in the subject token's ``aud``; ``audience`` picks the new
``aud`` (unknown → ``invalid_target``; not allowed for this client → ``access_denied``);
requested scopes may only narrow (→ ``invalid_scope``, decided by :mod:`visitflow.core.scopes`);
refresh tokens never outlive the session maximum.  Unlike Keycloak V2 we also set the RFC
8693 ``act`` claim naming the requesting client (nested for chains), so provenance can say
who acted for whom.  With ``fixed_scopes: true`` the exchange follows what Keycloak 26.7.3
was seen to do instead (:mod:`.keycloak_rules`, ``IdP._keycloak_exchange``).

Why hand-rolled on Starlette + pyjwt rather than authlib's server: authlib's OAuth server
integrations target Flask/Django, have no RFC 8693 grant, and its JWT access-token support
would still need the exchange, narrowing and session rules written here.  The parts that are
easy to get wrong — signing, verification, JWK encoding — are pyjwt's.

Status codes: error *bodies* are RFC 6749 §5.2 (``error``, ``error_description``).  A bad
token (subject token of an exchange, bearer at ``/userinfo``) is 401 ``invalid_token``;
refusals of authority (``invalid_scope``, ``access_denied``, ``invalid_target``,
``unauthorized_client``) are 403 so a caller can tell "refused, do not retry" from a
malformed request (400); ``invalid_client`` is 401.  Never a 500 for client input.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

import jwt
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import InvalidToken, OAuthError, ScopeError
from ..core.scopes import ScopeSet
from ..core.tokens import ALGORITHMS, decode_verified
from ..core.jsonlog import log_context
from ..core.readiness import run_checks
from . import acting, keycloak_rules, metrics
from .config import TOKEN_EXCHANGE, Client, IdPConfig
from .federation import Federation, identity_extra, subject_refused
from .health import readiness_checks
from .keys import KeyStore
from .revocations import RevocationLog

__all__ = [ 'ACCESS_TOKEN_TYPE', 'REFRESH_TOKEN_TYPE', 'JWT_TOKEN_TYPE', 'error_response',
    'invalid_scope', 'Session', 'RefreshRecord', 'State', 'MemoryRefreshes', 'IdP', 'authenticate_client',
    'create_app',
]

log = logging.getLogger("visitflow.idp")

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def error_response(exc: OAuthError) -> JSONResponse:
    """The RFC 6749 error body for a refusal, never cached."""
    headers = {"Cache-Control": "no-store", **(exc.headers or {})}
    return JSONResponse({"error": exc.error, "error_description": exc.description}, exc.status, headers=headers)


def invalid_scope(description: str) -> OAuthError:
    return OAuthError("invalid_scope", description, 403)


@dataclass
class Session:
    """A login (or exchange) session: refresh tokens live no longer than ``max_expiry``."""

    sid: str
    sub: str
    client_id: str
    scopes: ScopeSet
    aud: list
    max_expiry: float
    act: dict | None = None
    username: str | None = None
    claims: dict | None = None      # the user's extra claims (config), on login sessions only
    revoked: bool = False
    refreshable: bool = True  # Keycloak mode: an exchange session holds refresh tokens only on request
    #: Production: the subject's identity claims, to ask the authority again at refresh.
    subject: dict | None = None
    #: Access tokens of this session never outlive ``max_expiry`` (minted from our own token).
    cap: bool = False


@dataclass
class RefreshRecord:
    session: Session
    scopes: ScopeSet
    expires: float
    used: bool = False


@dataclass
class State:
    """IdP state: sessions and refresh tokens in memory; revoked jtis and sessions also in
    the :class:`RevocationLog` when one is configured (so they survive a restart)."""

    sessions: dict = field(default_factory=dict)
    refresh: dict = field(default_factory=dict)
    revoked_jti: dict = field(default_factory=dict)  # jti -> exp
    revoked_sid: dict = field(default_factory=dict)  # sid -> exp
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemoryRefreshes:
    """Refresh tokens in this process (file mode, one node).  Several replicas use
    :class:`.pg_state.PostgresRefreshes` instead: the same three calls."""

    def __init__(self, state: State):
        self.state = state

    def put(self, token: str, rec: RefreshRecord) -> None:
        with self.state.lock:
            self.state.refresh[token] = rec

    def peek(self, token: str) -> RefreshRecord | None:
        with self.state.lock:
            return self.state.refresh.get(token)

    def redeem(self, token: str) -> tuple[RefreshRecord | None, bool]:
        """(record, fresh): marks it used; ``fresh`` is False if it was used already."""
        with self.state.lock:
            rec = self.state.refresh.get(token)
            fresh = rec is not None and not rec.used
            if fresh:
                rec.used = True
            return rec, fresh


class IdP:
    """Token logic, independent of HTTP so it reads top to bottom."""

    def __init__(self, config: IdPConfig, keys: KeyStore, issuer: str, revocations: RevocationLog | None = None):
        self.config = config
        self.keys = keys
        self.issuer = issuer.rstrip("/")
        self.state = State()
        self.revocations = revocations or RevocationLog(None)
        self.state.revoked_jti, self.state.revoked_sid = self.revocations.load()
        #: PostgreSQL mode: the shared table (pg_state); else this process's memory
        self.refreshes = getattr(self.revocations, "refreshes", None) or MemoryRefreshes(self.state)
        self.federation = Federation.from_config(config.federation) if config.federation else None

    def _sync_revocations(self) -> None:
        """Merge the revocations other replicas made (PostgreSQL mode; at most
        ``state.poll_seconds`` stale); a no-op for the file log."""
        poll = getattr(self.revocations, "poll", None)
        fresh = poll() if poll else None
        if fresh is not None:
            now = time.time()
            with self.state.lock:
                for mine, theirs in zip((self.state.revoked_jti, self.state.revoked_sid), fresh):
                    mine.update(theirs)
                    for ident in [i for i, exp in mine.items() if exp < now]:
                        del mine[ident]

    def _revoke_session(self, session: Session) -> None:
        session.revoked = True
        with self.state.lock:
            self.state.revoked_sid[session.sid] = max(session.max_expiry, time.time() + 86400)
        metrics.REVOCATIONS.labels("sid").inc()
        self.revocations.append("sid", session.sid, max(session.max_expiry, time.time() + 86400))

    # ---------------------------------------------------------------- issuing
    def _sign(self, claims: dict, typ: str = "at+jwt") -> str:
        self.keys.reload_if_changed()
        key = self.keys.current
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "typ": typ})

    def access_token(self, *, sub: str, client_id: str, aud: list, scopes: ScopeSet,
                     sid: str | None = None, act: dict | None = None, extra: dict | None = None,
                     not_after: float | None = None) -> tuple[str, int]:
        limits = self.config.limits
        if len(scopes) > limits.max_scopes:
            raise OAuthError("invalid_scope", f"this token would carry {len(scopes)} scopes; the limit is "
                             f"{limits.max_scopes}: ask for the scopes you need (scope=...)", 400)
        now = int(time.time())
        lifetime = self.config.lifetimes_for(aud).access
        if not_after is not None:  # never outlive the user session / the subject token it came from
            lifetime = max(0, min(lifetime, int(not_after) - now))
        claims = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud[0] if len(aud) == 1 else list(aud),
            "azp": client_id,
            "client_id": client_id,
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "jti": str(uuid.uuid4()),
            "scope": str(scopes),
        }
        if sid:
            claims["sid"] = sid
        if act:
            claims["act"] = act
        claims.update(extra or {})
        token = self._sign(claims)
        if len(token) > limits.max_token_bytes:
            raise OAuthError("invalid_scope", f"this token would be {len(token)} bytes; the limit is "
                             f"{limits.max_token_bytes}: ask for fewer scopes (scope=...)", 400)
        return token, lifetime

    def id_token(self, *, sub: str, client_id: str, username: str | None) -> str:
        now = int(time.time())
        return self._sign(
            {
                "iss": self.issuer, "sub": sub, "aud": client_id, "azp": client_id,
                "exp": now + self.config.lifetimes.id_token, "iat": now,
                "preferred_username": username or sub,
                "typ": "ID",  # as Keycloak does: validators refuse it as an access token
            },
            typ="JWT",
        )

    def _new_refresh(self, session: Session, scopes: ScopeSet) -> tuple[str, int]:
        lifetimes = self.config.lifetimes_for(session.aud)
        expires = min(time.time() + lifetimes.refresh, session.max_expiry)
        token = secrets.token_urlsafe(32)
        self.refreshes.put(token, RefreshRecord(session, scopes, expires))
        return token, int(expires - time.time())

    def _response(self, session: Session, scopes: ScopeSet, *, with_refresh: bool,
                  issued_token_type: str | None = None, id_token: bool = False) -> dict:
        token, lifetime = self.access_token(
            sub=session.sub, client_id=session.client_id, aud=session.aud, scopes=scopes,
            sid=session.sid, act=session.act,
            extra={**({"preferred_username": session.username} if session.username else {}),
                   **(session.claims or {}), **identity_extra(session.subject or {})},
            not_after=session.max_expiry if (self.config.fixed_scopes or session.cap) else None,
        )
        body = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": str(scopes)}
        if issued_token_type:
            body["issued_token_type"] = issued_token_type
        if with_refresh and time.time() < session.max_expiry:
            body["refresh_token"], body["refresh_expires_in"] = self._new_refresh(session, scopes)
        if id_token:
            body["id_token"] = self.id_token(sub=session.sub, client_id=session.client_id, username=session.username)
        return body

    def _session(self, **kw) -> Session:
        s = Session(sid=str(uuid.uuid4()), **kw)
        with self.state.lock:
            self.state.sessions[s.sid] = s
        return s

    @staticmethod
    def _narrow(granted: ScopeSet, requested: str | None, what: str) -> ScopeSet:
        if requested is None or not requested.strip():
            return granted
        try:
            wanted = ScopeSet.parse(requested)
        except ScopeError as exc:
            raise invalid_scope(str(exc)) from exc
        missing = granted.uncovered(wanted)
        if missing:
            raise invalid_scope(f"{what} does not cover: {' '.join(map(str, missing))}")
        return wanted

    # ---------------------------------------------------------------- validating our own tokens
    def validate(self, token: str, *, audience: str | None = None, check_revoked: bool = True) -> dict:
        """Validate a token this IdP issued (any audience unless given). Raises InvalidToken."""
        if not token:
            raise InvalidToken("no token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:  # DecodeError, or InvalidTokenError for e.g. a non-string kid
            raise InvalidToken(f"malformed token: {exc}") from exc
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken(f"signing algorithm {header.get('alg')!r} is not accepted")
        if str(header.get("typ", "")).lower() not in ("at+jwt", "application/at+jwt"):
            raise InvalidToken(f"token type {header.get('typ')!r} is not an access token")
        self.keys.reload_if_changed()
        public = self.keys.public_key(header.get("kid", ""))
        if public is None:
            raise InvalidToken(f"unknown signing key id {header.get('kid')!r}")
        claims = decode_verified(token, public, issuer=self.issuer, audience=[audience] if audience else None,
                                 leeway=0,  # our own clock: no skew to allow for
                                 require=("iss", "sub", "aud", "exp", "iat", "jti"))
        if check_revoked:
            self._sync_revocations()
            with self.state.lock:
                revoked = claims["jti"] in self.state.revoked_jti or claims.get("sid") in self.state.revoked_sid
                session = self.state.sessions.get(claims.get("sid", ""))
            if revoked or (session is not None and session.revoked):
                raise InvalidToken("token has been revoked", code="revoked")
        return claims

    # ---------------------------------------------------------------- grants
    def password(self, client: Client, form) -> dict:
        if self.config.production:
            raise OAuthError("unsupported_grant_type", "no password grant here: log in at the facility IdP")
        user = self.config.users.get(form.get("username", ""))
        if user is None or not hmac.compare_digest(user.password, form.get("password", "")):
            raise OAuthError("invalid_grant", "invalid username or password")
        allowed = user.scopes | ScopeSet.parse("openid profile")
        scopes = self._narrow(allowed, form.get("scope"), f"user {user.username}'s roles") if form.get("scope") else user.scopes
        session = self._session(
            sub=user.username, client_id=client.client_id, scopes=scopes, aud=list(client.audiences),
            max_expiry=time.time() + self.config.lifetimes_for(list(client.audiences)).session_max,
            username=user.username, claims=user.claims,
        )
        return self._response(session, scopes, with_refresh="refresh_token" in client.grants,
                              id_token=scopes.covers("openid"))

    def client_credentials(self, client: Client, form) -> dict:
        if client.public:
            raise OAuthError("unauthorized_client", "public clients cannot use client_credentials", 403)
        scopes = self._narrow(ScopeSet.parse(client.scopes), form.get("scope"), f"client {client.client_id}'s scopes")
        session = self._session(
            sub=f"service-account-{client.client_id}", client_id=client.client_id, scopes=scopes,
            aud=list(client.audiences), max_expiry=time.time(),
        )
        return self._response(session, scopes, with_refresh=False)

    def refresh(self, client: Client, form) -> dict:
        token = form.get("refresh_token", "")
        rec, ok = self.refreshes.redeem(token)
        if rec is not None and not ok:
            # Reuse of a rotated refresh token: someone copied it. Kill the session (its family),
            # at every replica: the revocation is in the shared state.
            self._revoke_session(rec.session)
        if not ok:
            raise OAuthError("invalid_grant", "refresh token is unknown, used or revoked")
        if rec.session.client_id != client.client_id:
            raise OAuthError("invalid_grant", "refresh token was issued to another client")
        if rec.session.revoked:
            raise OAuthError("invalid_grant", "session has been revoked")
        if time.time() >= rec.expires:
            raise OAuthError("invalid_grant", "refresh token has expired (session maximum reached)"
                             if time.time() >= rec.session.max_expiry else "refresh token has expired")
        scopes = self._narrow(rec.scopes, form.get("scope"), "the refresh token's scope")
        if self.federation is not None and rec.session.subject is not None:
            self.federation.recheck(rec.session.subject, scopes)
        return self._response(rec.session, scopes, with_refresh=True)

    def token_exchange(self, client: Client, form) -> dict:
        if form.get("requested_subject") is not None or client.act_for:
            return self._act_for(client, form)
        if client.public:
            raise OAuthError("unauthorized_client", "public clients cannot exchange tokens", 403)
        subject_type = form.get("subject_token_type", "")
        if subject_type not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise OAuthError("invalid_request", f"unsupported subject_token_type {subject_type!r}")
        requested_type = form.get("requested_token_type", ACCESS_TOKEN_TYPE)
        if requested_type not in (ACCESS_TOKEN_TYPE, REFRESH_TOKEN_TYPE):
            raise OAuthError("invalid_request", f"unsupported requested_token_type {requested_type!r}")
        token, federated = form.get("subject_token", ""), False
        try:
            if self.federation is not None:
                subject_issuer = self.federation.issuer_of(token)
                federated = subject_issuer != self.issuer
            if federated:  # the facility IdP's token (production): verified by its JWKS
                subject = self.federation.validate_subject(token, subject_issuer, client.client_id)
            else:
                subject = self.validate(token)
        except InvalidToken as exc:
            raise subject_refused(exc) from exc
        subject_aud = [subject["aud"]] if isinstance(subject["aud"], str) else list(subject["aud"])
        if client.client_id not in subject_aud:
            raise OAuthError("access_denied", f"client {client.client_id} is not within the subject token's audience", 403)
        audiences = form.getlist("audience") if hasattr(form, "getlist") else [form.get("audience")]
        audiences = [a for a in audiences if a] or [client.client_id]
        for aud in audiences:
            if aud not in self.config.audiences:
                raise OAuthError("invalid_target", f"unknown audience {aud!r}", 403)
            if aud not in client.exchange_audiences:
                raise OAuthError("access_denied", f"client {client.client_id} may not exchange for audience {aud!r}", 403)
        if federated:  # identity only: the authority decides what is minted
            scopes = self.federation.mint_scopes(subject, form.get("scope"))
        elif self.config.fixed_scopes:
            return self._keycloak_exchange(client, form, subject, audiences, requested_type)
        else:
            scopes = self._narrow(ScopeSet.lenient(subject.get("scope")), form.get("scope"),
                                  "the subject token's scope")
        if self.federation is not None and not federated:
            self.federation.recheck(subject, scopes)
        act = {"sub": client.client_id}
        if subject.get("act"):
            act["act"] = subject["act"]
        lifetimes = self.config.lifetimes_for(audiences)
        session = self._session(
            sub=subject["sub"], client_id=client.client_id, scopes=scopes, aud=audiences, act=act,
            # A delegated session cannot outlive the authority it was delegated from — except
            # a grant minted on the authority's answer (federation module docstring).
            max_expiry=(time.time() + lifetimes.session_max if federated
                        else min(time.time() + lifetimes.session_max, float(subject["exp"]))),
            username=subject.get("preferred_username"),
            subject={"sub": subject["sub"], **identity_extra(subject)} if self.federation else None,
            cap=self.federation is not None and not federated,
        )
        log.info("exchange: client=%s sub=%s aud=%s scope=%r", client.client_id, subject["sub"], audiences, str(scopes))
        # RFC 8693 (and Keycloak): a refresh token only when asked for, by a client enabled for it
        return self._response(session, scopes,
                              with_refresh=client.exchange_refresh and requested_type == REFRESH_TOKEN_TYPE,
                              issued_token_type=ACCESS_TOKEN_TYPE)

    def _act_for(self, client: Client, form) -> dict:
        """Staff recovery (:mod:`.acting`): a staff member's own token, a grant for the user."""
        if not client.act_for:
            raise OAuthError("unauthorized_client", f"client {client.client_id} may not act for users "
                             "(requested_subject)", 403)
        if form.get("subject_token_type", "") not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise OAuthError("invalid_request", f"unsupported subject_token_type {form.get('subject_token_type')!r}")
        audiences = [a for a in (form.getlist("audience") if hasattr(form, "getlist") else [form.get("audience")])
                     if a] or ["visitflow"]
        for aud in audiences:
            if aud not in client.exchange_audiences:
                raise OAuthError("access_denied", f"client {client.client_id} may not exchange for audience {aud!r}", 403)
        staff, scopes, user = acting.decide_acting(self.federation, client.client_id, form.get("subject_token", ""),
                                                   form.get("requested_subject", ""), form.get("scope"))
        session = self._session(
            sub=user["sub"], client_id=client.client_id, scopes=scopes, aud=audiences,
            act={"sub": staff["sub"]}, max_expiry=time.time() + self.config.lifetimes_for(audiences).session_max,
            username=user["preferred_username"], subject=user, cap=False,
        )
        return self._response(session, scopes, with_refresh=False, issued_token_type=ACCESS_TOKEN_TYPE)

    def _keycloak_exchange(self, client: Client, form, subject: dict, audiences: list, requested_type: str) -> dict:
        """``fixed_scopes`` mode: what Keycloak 26.7.3 does (tests/token_service/test_keycloak_parity.py).

        Scopes per :func:`.keycloak_rules.exchange_scopes` (unknown → ``invalid_scope``, not
        held → dropped, not bounded by the subject token); no ``act``; every token ends with the
        user's session; a refresh token only if asked for (``requested_token_type``), by a
        client enabled for it, from a subject whose session can hold one (a login, or an
        exchange that itself asked for a refresh token) — else ``invalid_request``."""
        scopes, unknown = keycloak_rules.exchange_scopes(self.config, subject["sub"], form.get("scope"))
        if unknown:
            raise invalid_scope(f"Invalid scopes: {form.get('scope')}")
        with self.state.lock:
            parent = self.state.sessions.get(subject.get("sid", ""))
        refresh = requested_type == REFRESH_TOKEN_TYPE
        if refresh and not client.exchange_refresh:
            raise OAuthError("invalid_request", "requested_token_type unsupported")
        if refresh and (parent is None or not parent.refreshable):
            raise OAuthError("invalid_request",
                             "Refresh token not valid as requested_token_type because creating a new session is needed")
        session = self._session(
            sub=subject["sub"], client_id=client.client_id, scopes=scopes, aud=audiences,
            max_expiry=parent.max_expiry if parent is not None else float(subject["exp"]),
            username=subject.get("preferred_username"), refreshable=refresh,
        )
        log.info("exchange (Keycloak rules): client=%s sub=%s aud=%s scope=%r", client.client_id, subject["sub"],
                 audiences, str(scopes))
        return self._response(session, scopes, with_refresh=refresh, issued_token_type=requested_type)

    def introspect(self, token: str) -> dict:
        rec = self.refreshes.peek(token)
        if rec is not None:
            active = not rec.used and not rec.session.revoked and time.time() < rec.expires
            return {"active": active, "token_type": "refresh_token", "sub": rec.session.sub,
                    "client_id": rec.session.client_id, "exp": int(rec.expires)} if active else {"active": False}
        try:
            claims = self.validate(token)
        except InvalidToken:
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}

    def revoke(self, client: Client, token: str) -> None:
        rec = self.refreshes.peek(token)
        if rec is not None and rec.session.client_id == client.client_id:
            self._revoke_session(rec.session)
            return
        try:
            claims = self.validate(token, check_revoked=False)
        except InvalidToken:
            return  # RFC 7009: invalid tokens are not an error
        aud = [claims["aud"]] if isinstance(claims["aud"], str) else list(claims["aud"])
        # The client it was issued to, its audience (visitflow revokes a grant it is done
        # with), or a client trusted to introspect.
        if claims.get("azp") == client.client_id or client.client_id in aud or client.introspect:
            with self.state.lock:
                self.state.revoked_jti[claims["jti"]] = claims["exp"]
            self.revocations.append("jti", claims["jti"], float(claims["exp"]))
            metrics.REVOCATIONS.labels("jti").inc()


# -------------------------------------------------------------------- HTTP layer
#: grant_type -> metric label (bounded: a client cannot invent label values)
_GRANT_LABELS = {"password": "password", "client_credentials": "client_credentials",
                 "refresh_token": "refresh_token", TOKEN_EXCHANGE: "token_exchange"}

def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        cid, _, secret = decoded.partition(":")
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a client error
        raise OAuthError("invalid_client", "malformed Basic credentials", 401,
                         {"WWW-Authenticate": 'Basic realm="visitflow"'}) from exc
    return unquote_plus(cid), unquote_plus(secret)


def authenticate_client(idp: IdP, request: Request, form) -> Client:
    """client_secret_basic, client_secret_post, or a public client naming itself."""
    basic = _basic_credentials(request)
    cid, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
    fail = OAuthError("invalid_client", "client authentication failed", 401,
                      {"WWW-Authenticate": 'Basic realm="visitflow"'})
    if not cid:
        raise fail
    client = idp.config.clients.get(cid)
    if client is None:
        raise fail
    if client.public:
        if secret:
            raise fail
        return client
    if not secret or not hmac.compare_digest(client.secret.encode(), secret.encode()):
        raise fail
    return client


def create_app(config: IdPConfig, keys: KeyStore, issuer: str, revocations: RevocationLog | None = None) -> Starlette:
    idp = IdP(config, keys, issuer, revocations)
    grants = {
        "password": idp.password,
        "client_credentials": idp.client_credentials,
        "refresh_token": idp.refresh,
        TOKEN_EXCHANGE: idp.token_exchange,
    }
    if config.production:
        del grants["password"]

    async def discovery(request: Request):
        base = idp.issuer
        return JSONResponse({
            "issuer": base,
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks",
            "introspection_endpoint": f"{base}/introspect",
            "revocation_endpoint": f"{base}/revoke",
            "userinfo_endpoint": f"{base}/userinfo",
            "authorization_endpoint": f"{base}/authorize",
            "device_authorization_endpoint": f"{base}/device",
            "grant_types_supported": sorted(grants),
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "id_token_signing_alg_values_supported": list(ALGORITHMS),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "profile"],
        })

    async def jwks(request: Request):
        await run_in_threadpool(idp.keys.reload_if_changed)
        return JSONResponse(idp.keys.jwks(), headers={"Cache-Control": "max-age=60"})

    async def token(request: Request):
        start, client_label, grant_label = time.monotonic(), "unauthenticated", "unknown"
        try:
            with log_context(request_id=request.headers.get("x-request-id") or uuid.uuid4().hex[:16]):
                form = await request.form()
                grant = form.get("grant_type", "")
                grant_label = _GRANT_LABELS.get(grant, "unknown")
                client = authenticate_client(idp, request, form)
                client_label = client.client_id
                handler = grants.get(grant)
                if handler is None:
                    raise OAuthError("unsupported_grant_type", f"unsupported grant_type {grant!r}")
                if grant not in client.grants:
                    raise OAuthError("unauthorized_client", f"client {client.client_id} may not use {grant}", 403)
                # Off the event loop: federation may fetch a JWKS and ask the authority (OPA).
                body = await run_in_threadpool(handler, client, form)
                metrics.REQUESTS.labels(client_label, grant_label, "ok").inc()
                return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
        except OAuthError as exc:
            log.info("token refused: client=%s grant=%s: %s", client_label, grant_label, exc)
            metrics.REQUESTS.labels(client_label, grant_label, exc.error).inc()
            return error_response(exc)
        finally:
            metrics.REQUEST_SECONDS.labels(grant_label).observe(time.monotonic() - start)

    async def introspect(request: Request):
        try:
            form = await request.form()
            client = authenticate_client(idp, request, form)
            if not client.introspect:
                raise OAuthError("unauthorized_client", f"client {client.client_id} may not introspect", 403)
            return JSONResponse(await run_in_threadpool(idp.introspect, form.get("token", "")))
        except OAuthError as exc:
            return error_response(exc)

    async def revoke(request: Request):
        try:
            form = await request.form()
            client = authenticate_client(idp, request, form)
            await run_in_threadpool(idp.revoke, client, form.get("token", ""))
            return JSONResponse({})
        except OAuthError as exc:
            return error_response(exc)

    async def userinfo(request: Request):
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return JSONResponse({"error": "invalid_request", "error_description": "bearer token required"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="visitflow"'})
        try:
            claims = await run_in_threadpool(idp.validate, header[7:].strip())
        except OAuthError as exc:  # the shared state's database did not answer: 503
            return error_response(exc)
        except InvalidToken as exc:
            return JSONResponse({"error": "invalid_token", "error_description": exc.reason}, 401,
                                headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'})
        return JSONResponse({"sub": claims["sub"], "preferred_username": claims.get("preferred_username", claims["sub"]),
                             "scope": claims.get("scope", "")})

    async def health(request: Request):
        """Liveness (``/health``, kept for old probes, and ``/healthz``): the process serves."""
        return JSONResponse({"status": "ok", "issuer": idp.issuer})

    checks = readiness_checks(idp)

    async def readyz(request: Request):
        """Readiness: every dependency answers now (:mod:`.health`); else 503 naming which and why."""
        ready, body = await run_checks(checks)
        return JSONResponse(body, 200 if ready else 503, headers={"Cache-Control": "no-store"})

    async def metrics_endpoint(request: Request):
        from starlette.responses import Response

        payload, content_type = metrics.exposition()
        return Response(payload, media_type=content_type)

    app = Starlette(routes=[
        Route("/.well-known/openid-configuration", discovery),
        Route("/jwks", jwks),
        Route("/token", token, methods=["POST"]),
        Route("/introspect", introspect, methods=["POST"]),
        Route("/revoke", revoke, methods=["POST"]),
        Route("/userinfo", userinfo, methods=["GET", "POST"]),
        Route("/health", health),
        Route("/healthz", health),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ])
    metrics.install()
    app.state.idp = idp
    return app
