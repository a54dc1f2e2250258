"""The dev IdP's configuration: users, their visit scopes, clients and token lifetimes (YAML).

The same clients, audiences and scopes are described for production in
``deployments/keycloak/realm.json``; a test keeps the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, ScopeError
from ..core.scopes import ScopeSet

__all__ = [ 'TOKEN_EXCHANGE', 'KNOWN_GRANTS', 'Lifetimes', 'Client', 'User',
    'RESERVED_CLAIMS', 'Limits', 'StateConfig', 'IdPConfig',
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
KNOWN_GRANTS = {"password", "client_credentials", "refresh_token", TOKEN_EXCHANGE}


@dataclass(frozen=True)
class Lifetimes:
    access: int = 300
    refresh: int = 1800
    session_max: int = 36000
    id_token: int = 300

    @classmethod
    def from_dict(cls, d: dict | None, base: "Lifetimes | None" = None) -> "Lifetimes":
        base = base or cls()
        d = d or {}
        unknown = set(d) - {"access", "refresh", "session_max", "id_token"}
        if unknown:
            raise ConfigError(f"unknown lifetime keys {sorted(unknown)}")
        vals = {k: int(d.get(k, getattr(base, k))) for k in ("access", "refresh", "session_max", "id_token")}
        for k, v in vals.items():
            if v <= 0:
                raise ConfigError(f"lifetime {k} must be positive, got {v}")
        return cls(**vals)


@dataclass(frozen=True)
class Client:
    client_id: str
    secret: str | None = None
    public: bool = False
    grants: frozenset = frozenset()
    audiences: tuple = ()            # aud of tokens issued *to* this client (login / client_credentials)
    exchange_audiences: tuple = ()   # audiences it may request in token exchange
    exchange_refresh: bool = False   # exchanged tokens come with a refresh token
    introspect: bool = False
    scopes: tuple = ()               # client_credentials scopes (service accounts)
    #: staff recovery (:mod:`.acting`): exchanges a staff member's own facility token for a
    #: grant that acts for the user named by ``requested_subject``; the authority decides
    act_for: bool = False


@dataclass(frozen=True)
class User:
    username: str
    password: str
    scopes: ScopeSet
    #: Extra claims in the user's login tokens, e.g. ``{fedid: abc12345}`` (blueapi takes a
    #: task's ``user`` from ``fedid``).  Registered claims cannot be set this way.
    claims: dict = field(default_factory=dict)


RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "azp", "client_id",
                             "sid", "act", "typ", "preferred_username"})


@dataclass(frozen=True)
class Limits:
    """What one token may carry (issue 20 finding 4: a 481 KiB token of 20,000 scopes made
    every request with it cost 5x).  Over a limit the request is refused with the reason
    (``invalid_scope``, 400) — never silently truncated: a token that says less than the
    user asked for would fail later, somewhere less clear.  ``max_header_bytes`` caps the
    request headers the token service reads (:mod:`visitflow.core.asgi_limits`)."""

    max_scopes: int = 200
    max_token_bytes: int = 12 * 1024
    max_header_bytes: int = 16 * 1024

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        d = dict(d or {})
        out = cls(**{k: int(d.pop(k)) for k in ("max_scopes", "max_token_bytes", "max_header_bytes") if k in d})
        if d:
            raise ConfigError(f"limits: unknown keys {sorted(d)}")
        return out


@dataclass(frozen=True)
class StateConfig:
    """Where the token service keeps what must outlive a process and be shared by replicas:
    revocations, refresh-token families, signing keys (docs/operations.md "Token service on
    several replicas").

    ``kind: file`` (the default; ``visitflow up``): one node, ``--state-dir`` on local disk.
    ``kind: postgres``: every replica reads and writes one PostgreSQL database
    (:mod:`.pg_state`).  The database URL holds a password, so it is never written in the
    config: ``database_url_env`` names the environment variable it is read from, here and
    nowhere else (in Kubernetes, from the Secret ``visitflow-token-service``).

    ``poll_seconds`` bounds how stale a replica's view of revocations and keys may be: a
    revocation made at one replica is honoured at every other within it (plus one query).
    ``key_publish_ahead`` is how long a new key is in the JWKS before any replica signs with
    it (> ``poll_seconds``: every replica knows the key before it sees a token signed by it);
    ``key_overlap`` how long a key stays in the JWKS after it stopped signing (at least the
    longest access-token lifetime, so no token outlives its key)."""

    kind: str = "file"
    database_url: str | None = None
    poll_seconds: float = 1.0
    key_publish_ahead: float = 5.0
    key_overlap: float = 90000.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "StateConfig":
        d = dict(d or {})
        kind = d.pop("kind", "file")
        if kind not in ("file", "postgres"):
            raise ConfigError(f"state.kind must be file or postgres, got {kind!r}")
        if "database_url" in d:
            raise ConfigError("state: the database URL holds a password: name the variable it is in "
                              "(database_url_env), never the URL itself")
        url_env = d.pop("database_url_env", None)
        nums = {k: float(d.pop(k)) for k in ("poll_seconds", "key_publish_ahead", "key_overlap") if k in d}
        if d:
            raise ConfigError(f"state: unknown keys {sorted(d)}")
        url = None
        if kind == "postgres":
            if not url_env:
                raise ConfigError("state.kind postgres needs database_url_env (the variable holding the URL)")
            url = os.environ.get(url_env)
            if not url:
                raise ConfigError(f"state: ${url_env} is not set (the token service's database URL)")
        out = cls(kind=kind, database_url=url, **nums)
        if out.poll_seconds <= 0 or out.key_publish_ahead <= out.poll_seconds:
            raise ConfigError("state: need 0 < poll_seconds < key_publish_ahead (a replica must know a key "
                              "before any replica signs with it)")
        return out


@dataclass
class IdPConfig:
    issuer: str | None = None
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    audiences: dict = field(default_factory=dict)   # name -> Lifetimes
    clients: dict = field(default_factory=dict)     # id -> Client
    users: dict = field(default_factory=dict)       # name -> User
    #: Emulate Keycloak's token exchange as observed on 26.7.3 (:mod:`.keycloak_rules`): scopes
    #: are a fixed list of client scopes, so run-specific ones are refused (``invalid_scope``)
    #: and scopes the user lacks are dropped; no ``act``; refresh only on request.  For trying
    #: grant_scope=visit without Keycloak (docs/production.md §3).
    fixed_scopes: bool = False
    #: The token service's production mode (:mod:`.federation`): no users, no password grant;
    #: subject tokens from the trusted facility IdP, decisions by the authority.
    production: bool = False
    federation: dict | None = None
    limits: Limits = field(default_factory=Limits)
    state: StateConfig = field(default_factory=StateConfig)

    def lifetimes_for(self, audience: str | list | None) -> Lifetimes:
        """Lifetimes of a token for ``audience``: the single audience's override, else defaults."""
        if isinstance(audience, list):
            audience = audience[0] if len(audience) == 1 else None
        return self.audiences.get(audience, self.lifetimes) if audience else self.lifetimes

    @classmethod
    def load(cls, path: str | Path) -> "IdPConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IdPConfig":
        unknown = set(d) - {"issuer", "lifetimes", "audiences", "clients", "users", "fixed_scopes",
                            "production", "federation", "limits", "state"}
        if unknown:
            raise ConfigError(f"unknown top-level keys {sorted(unknown)}")
        base = Lifetimes.from_dict(d.get("lifetimes"))
        audiences = {name: Lifetimes.from_dict(v, base) for name, v in (d.get("audiences") or {}).items()}
        clients = {}
        for cid, c in (d.get("clients") or {}).items():
            c = dict(c or {})
            grants = frozenset(c.pop("grants", []))
            bad = grants - KNOWN_GRANTS
            if bad:
                raise ConfigError(f"client {cid}: unknown grants {sorted(bad)}")
            secret = c.pop("secret", None)
            secret_env = c.pop("secret_env", None)  # production: the secret comes from the environment
            if secret_env:
                secret = os.environ.get(secret_env)
                if not secret:
                    raise ConfigError(f"client {cid}: ${secret_env} is not set")
            client = Client(
                client_id=cid,
                secret=secret,
                public=bool(c.pop("public", False)),
                grants=grants,
                audiences=tuple(c.pop("audiences", [])),
                exchange_audiences=tuple(c.pop("exchange_audiences", [])),
                exchange_refresh=bool(c.pop("exchange_refresh", False)),
                introspect=bool(c.pop("introspect", False)),
                scopes=tuple(c.pop("scopes", [])),
                act_for=bool(c.pop("act_for", False)),
            )
            if c:
                raise ConfigError(f"client {cid}: unknown keys {sorted(c)}")
            if not client.public and not client.secret:
                raise ConfigError(f"client {cid}: confidential clients need a secret")
            if client.act_for and (TOKEN_EXCHANGE not in client.grants or client.grants - {TOKEN_EXCHANGE}):
                raise ConfigError(f"client {cid}: an act_for client has the token-exchange grant only")
            for aud in client.audiences + client.exchange_audiences:
                if aud not in audiences:
                    raise ConfigError(f"client {cid}: audience {aud!r} is not declared under audiences")
            clients[cid] = client
        users = {}
        for name, u in (d.get("users") or {}).items():
            try:
                scopes = ScopeSet.parse(u.get("scopes", []))
            except ScopeError as exc:
                raise ConfigError(f"user {name}: {exc}") from exc
            claims = u.get("claims") or {}
            if not isinstance(claims, dict) or not all(isinstance(v, str) for v in claims.values()):
                raise ConfigError(f"user {name}: claims must map names to strings")
            if set(claims) & RESERVED_CLAIMS:
                raise ConfigError(f"user {name}: claims {sorted(set(claims) & RESERVED_CLAIMS)} are set by the IdP")
            users[name] = User(name, str(u["password"]), scopes, dict(claims))
        production = bool(d.get("production", False))
        if production:
            if users:
                raise ConfigError("production mode has no users: they log in at the facility IdP")
            for client in clients.values():
                if "password" in client.grants:
                    raise ConfigError(f"client {client.client_id}: production mode has no password grant")
            if not d.get("federation"):
                raise ConfigError("production mode needs federation (the facility IdP it trusts, the authority)")
        return cls(issuer=d.get("issuer"), lifetimes=base, audiences=audiences, clients=clients, users=users,
                   fixed_scopes=bool(d.get("fixed_scopes", False)), production=production,
                   federation=d.get("federation"), limits=Limits.from_dict(d.get("limits")),
                   state=_checked_state(StateConfig.from_dict(d.get("state")), base, audiences))


def _checked_state(state: StateConfig, base: Lifetimes, audiences: dict) -> StateConfig:
    """A key retired while a token it signed is still valid would fail that token."""
    longest = max([base.access, *(a.access for a in audiences.values())])
    if state.kind == "postgres" and state.key_overlap < longest:
        raise ConfigError(f"state.key_overlap ({state.key_overlap:.0f} s) is shorter than the longest "
                          f"access-token lifetime ({longest} s)")
    return state
