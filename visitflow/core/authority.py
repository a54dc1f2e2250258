"""The authority: "may S run analysis X on visit V?", "may S read/write store T of V (run R)?".

One protocol, two implementations (docs/architecture.md §1, §4):

* :class:`ScopesAuthority` — the embedded default and today's behaviour: the subject's own
  token scopes decide (the dev IdP's users carry ``read:data:a1 run:saxs_average:a1``...).
* :class:`OPAAuthority` — a facility: an OPA server decides from its data bundle (subjects,
  sessions, proposals, beamline staff; ``deployments/opa/``).  REST ``POST /v1/data/<path>``
  with ``{"input": …}`` → ``{"result": …}``; answers are cached for ``cache_seconds`` (so a
  membership change takes effect within that window); when OPA cannot answer, every question
  raises :class:`~visitflow.errors.AuthorityUnavailable` — callers fail closed with a 503.

Who asks: the token service before it mints a delegation grant or a data token
(:mod:`visitflow.token_service.federation`), and Tiled for users' own tokens from the facility IdP
(:mod:`visitflow.tiled.access_policy`).  Run tokens minted by the token service are *not*
sent here: their scopes already are the authority's answer.

Every answer is a :class:`Decision` with a reason a person can act on; refusals are passed
on verbatim (OPA's reason reaches the user in the token service's ``error_description``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import httpx

from ..errors import AuthorityUnavailable, ConfigError
from . import signals
from .scopes import CONCRETE_STORES, DataScope, RunScope, ScopeSet

__all__ = ["Decision", "Subject", "Authority", "ScopesAuthority", "OPAAuthority", "decide_scopes",
           "authority_from_config",]


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str

    def __bool__(self) -> bool:  # so ``if authority.may_run(...)`` reads naturally
        return self.allow


@dataclass(frozen=True)
class Subject:
    """The verified identity an authority looks at.  ``claims`` are the claims of a token
    that was validated first (never an unverified token); ``scopes`` are its scopes, which
    only :class:`ScopesAuthority` uses."""

    claims: dict = field(default_factory=dict)

    @classmethod
    def from_claims(cls, claims: dict) -> "Subject":
        keep = ("iss", "sub", "preferred_username", "fedid", "azp", "beamline", "scope", "scp")
        return cls({k: claims[k] for k in keep if k in claims})

    @property
    def scopes(self) -> ScopeSet:
        return ScopeSet.lenient(self.claims.get("scope", self.claims.get("scp")))

    @property
    def name(self) -> str:
        c = self.claims
        return str(c.get("fedid") or c.get("preferred_username") or c.get("sub") or "?")

    def policy_input(self) -> dict:
        """What OPA sees of the subject: identity claims, not scopes (OPA decides those)."""
        return {k: v for k, v in self.claims.items() if k not in ("scope", "scp")}

    def cache_key(self) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in self.policy_input().items()))


class Authority(Protocol):
    """What the token service and Tiled ask.  Implementations raise
    :class:`AuthorityUnavailable` rather than guess."""

    def may_run(self, subject: Subject, analysis: str, visit: str) -> Decision: ...

    def may_access(self, subject: Subject, action: str, store: str, visit: str,
                   run: Optional[str] = None) -> Decision: ...

    def readable_visits(self, subject: Subject) -> set[str]: ...

    def may_act_for(self, actor: Subject, user: str, visit: str) -> Decision: ...

    async def amay_access(self, subject: Subject, action: str, store: str, visit: str,
                          run: Optional[str] = None) -> Decision: ...

    async def areadable_visits(self, subject: Subject) -> set[str]: ...


def decide_scopes(authority: Authority, subject: Subject, scopes: ScopeSet) -> Decision:
    """May ``subject`` hold every scope of ``scopes``?  (The token service's question before
    it mints them.)  ``data`` scopes ask about both stores; opaque scopes are refused —
    the token service mints visitflow scopes only."""
    if not len(scopes):
        return Decision(False, "no scope requested: name the analysis, visit and run")
    reasons = []
    for scope in scopes:
        if isinstance(scope, RunScope):
            if scope.analysis == "*":
                return Decision(False, f"{scope} names no analysis; ask for one analysis")
            d = authority.may_run(subject, scope.analysis, scope.visit)
        elif isinstance(scope, DataScope):
            stores = CONCRETE_STORES if scope.store == "data" else (scope.store,)
            d = Decision(True, "")
            for store in stores:
                d = authority.may_access(subject, scope.action, store, scope.visit, scope.run)
                if not d:
                    break
        else:
            return Decision(False, f"scope {scope} is not one the token service mints")
        if not d:
            return Decision(False, d.reason)
        reasons.append(d.reason)
    return Decision(True, "; ".join(reasons))


class ScopesAuthority:
    """The subject's own token scopes decide (the embedded default)."""

    def may_run(self, subject: Subject, analysis: str, visit: str) -> Decision:
        ok = subject.scopes.may_run(analysis, visit)
        return Decision(ok, f"{subject.name}'s token {'grants' if ok else 'does not grant'} "
                            f"{RunScope(analysis, visit)}")

    def may_access(self, subject: Subject, action: str, store: str, visit: str,
                   run: Optional[str] = None) -> Decision:
        wanted = DataScope(action, store, visit, run)
        ok = subject.scopes.covers(wanted)
        return Decision(ok, f"{subject.name}'s token {'covers' if ok else 'does not cover'} {wanted}")

    def readable_visits(self, subject: Subject) -> set[str]:
        return subject.scopes.visits()

    def may_act_for(self, actor: Subject, user: str, visit: str) -> Decision:
        """Token scopes say nothing about who is staff: only a policy (OPA) can decide."""
        return Decision(False, "acting for another user needs an authority that knows the facility's staff (OPA)")

    async def amay_access(self, subject, action, store, visit, run=None) -> Decision:
        return self.may_access(subject, action, store, visit, run)

    async def areadable_visits(self, subject: Subject) -> set[str]:
        return self.readable_visits(subject)


class _TTLCache:
    """A small, thread-safe decision cache: answers live ``seconds``, at most ``size`` kept.
    ``clock`` (monotonic seconds) is injectable so a test can step over the window."""

    def __init__(self, seconds: float, size: int = 8192, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.size, self.clock = seconds, size, clock
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        if self.seconds <= 0:
            return None
        with self._lock:
            hit = self._items.get(key)
            fresh = hit is not None and hit[0] >= self.clock()
        signals.emit("authority.cache", hit=fresh)
        return hit[1] if fresh else None

    def put(self, key, value) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            if len(self._items) >= self.size:
                self._items.clear()
            self._items[key] = (self.clock() + self.seconds, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class OPAAuthority:
    """Ask an OPA server (``url``, policy package ``package`` = ``visitflow/authz``).

    Queries ``<package>/decision`` (input: subject, action, store, visit, run, analysis →
    ``{"allow", "reason"}``) and ``<package>/readable_visits`` (input: subject → list).
    Positive and negative answers are cached for ``cache_seconds``; failures are never cached.

    ``transport`` / ``async_transport`` carry the sync / async queries (``None``: the network;
    an ``httpx.MockTransport``, which is both, serves both when only ``transport`` is given)
    and ``clock`` times the cache window: what unit tests inject to run without OPA.

    ``token``: sent as ``Authorization: Bearer`` on every query, for an OPA run with
    ``--authentication=token --authorization=basic`` (deployments/opa/system_authz.rego):
    without it anyone who reaches OPA's port could also ``PUT`` its data.  The configuration
    names an environment variable (``token_env``), read by :func:`authority_from_config` only.
    """

    def __init__(self, url: str, package: str = "visitflow/authz", *, cache_seconds: float = 5.0,
                 timeout: float = 2.0, token: str | None = None, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url.rstrip("/")
        self.package = package.strip("/").replace(".", "/")
        self.timeout = timeout
        self.cache = _TTLCache(cache_seconds, clock=clock)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout, transport=transport, headers=self._headers)
        if async_transport is None and isinstance(transport, httpx.AsyncBaseTransport):
            async_transport = transport
        self._async_transport = async_transport
        self._aclient: Optional[httpx.AsyncClient] = None

    # -- transport ---------------------------------------------------------------------
    def _endpoint(self, rule: str) -> str:
        return f"{self.url}/v1/data/{self.package}/{rule}"

    @staticmethod
    def _result(rule: str, resp: httpx.Response) -> Any:
        if resp.status_code != 200:
            raise AuthorityUnavailable(f"the authority (OPA) answered {resp.status_code} for {rule}: {resp.text[:200]}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise AuthorityUnavailable(f"the authority (OPA) sent no JSON for {rule}") from exc
        if not isinstance(body, dict):  # a JSON string or list: "in" would not mean "has the key"
            raise AuthorityUnavailable(f"the authority (OPA) sent no JSON object for {rule}")
        if "result" not in body:
            raise AuthorityUnavailable(f"the authority (OPA) has no rule {rule} (is the policy loaded?)")
        return body["result"]

    # A query is idempotent, so a transport error is retried once at once: a pooled keep-alive
    # connection that OPA (or a proxy) closed meanwhile must not turn into a 503.
    def _query(self, rule: str, inp: dict) -> Any:
        start, ok = time.monotonic(), False
        try:
            for attempt in (1, 2):
                try:
                    out = self._result(rule, self._client.post(self._endpoint(rule), json={"input": inp}))
                    ok = True
                    return out
                except httpx.TransportError as exc:
                    if attempt == 2:
                        raise self._unreachable(exc) from exc
        finally:  # what /metrics counts (core.signals): latency, and whether OPA answered
            signals.emit("authority.decision", kind="opa", seconds=time.monotonic() - start, ok=ok)

    async def _aquery(self, rule: str, inp: dict) -> Any:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(timeout=self.timeout, transport=self._async_transport,
                                              headers=self._headers)
        start, ok = time.monotonic(), False
        try:
            for attempt in (1, 2):
                try:
                    out = self._result(rule, await self._aclient.post(self._endpoint(rule), json={"input": inp}))
                    ok = True
                    return out
                except httpx.TransportError as exc:
                    if attempt == 2:
                        raise self._unreachable(exc) from exc
        finally:
            signals.emit("authority.decision", kind="opa", seconds=time.monotonic() - start, ok=ok)

    def _unreachable(self, exc: Exception) -> AuthorityUnavailable:
        return AuthorityUnavailable(f"the authority (OPA at {self.url}) cannot be reached: {type(exc).__name__}")

    # -- answers -----------------------------------------------------------------------
    @staticmethod
    def _decision(result: Any) -> Decision:
        if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
            raise AuthorityUnavailable("the authority (OPA) answered without a boolean allow")
        return Decision(result["allow"], str(result.get("reason") or ("allowed" if result["allow"] else "refused")))

    @staticmethod
    def _question(subject: Subject, action: str, store: Optional[str], visit: str,
                  run: Optional[str], analysis: Optional[str]) -> dict:
        return {"subject": subject.policy_input(), "action": action, "store": store, "visit": visit,
                "run": run, "analysis": analysis}

    def _decide(self, inp: dict, key: tuple) -> Decision:
        hit = self.cache.get(key)
        if hit is None:
            hit = self._decision(self._query("decision", inp))
            self.cache.put(key, hit)
        return hit

    def may_run(self, subject: Subject, analysis: str, visit: str) -> Decision:
        return self._decide(self._question(subject, "run", None, visit, None, analysis),
                            (subject.cache_key(), "run", analysis, visit))

    def may_access(self, subject: Subject, action: str, store: str, visit: str,
                   run: Optional[str] = None) -> Decision:
        return self._decide(self._question(subject, action, store, visit, run, None),
                            (subject.cache_key(), action, store, visit, run))

    def may_act_for(self, actor: Subject, user: str, visit: str) -> Decision:
        """Staff recovery: may ``actor`` start analyses for ``user`` on ``visit``?"""
        inp = {"subject": actor.policy_input(), "action": "act_for", "visit": visit, "for_user": user}
        return self._decide(inp, (actor.cache_key(), "act_for", user, visit))

    def readable_visits(self, subject: Subject) -> set[str]:
        key = (subject.cache_key(), "visits")
        hit = self.cache.get(key)
        if hit is None:
            hit = self._visits(self._query("readable_visits", {"subject": subject.policy_input()}))
            self.cache.put(key, hit)
        return set(hit)

    async def amay_access(self, subject: Subject, action: str, store: str, visit: str,
                          run: Optional[str] = None) -> Decision:
        key = (subject.cache_key(), action, store, visit, run)
        hit = self.cache.get(key)
        if hit is None:
            hit = self._decision(await self._aquery("decision", self._question(subject, action, store, visit, run, None)))
            self.cache.put(key, hit)
        return hit

    async def areadable_visits(self, subject: Subject) -> set[str]:
        key = (subject.cache_key(), "visits")
        hit = self.cache.get(key)
        if hit is None:
            hit = self._visits(await self._aquery("readable_visits", {"subject": subject.policy_input()}))
            self.cache.put(key, hit)
        return set(hit)

    @staticmethod
    def _visits(result: Any) -> frozenset:
        if not isinstance(result, list) or not all(isinstance(v, str) for v in result):
            raise AuthorityUnavailable("the authority (OPA) answered readable_visits with something other than a list")
        return frozenset(result)


def authority_from_config(config: Optional[dict]) -> Authority:
    """``None`` / ``{kind: scopes}`` → :class:`ScopesAuthority`; ``{kind: opa, url, package,
    cache_seconds, timeout, token_env}`` → :class:`OPAAuthority`.

    ``token_env`` names the environment variable holding OPA's bearer token: this is the one
    place that reads it (a set but empty or missing variable is refused, not sent empty)."""
    config = dict(config or {})
    kind = config.pop("kind", "scopes")
    if kind == "scopes":
        if config:
            raise ConfigError(f"authority kind scopes takes no options, got {sorted(config)}")
        return ScopesAuthority()
    if kind == "opa":
        if "url" not in config:
            raise ConfigError("authority kind opa needs url (e.g. http://127.0.0.1:8181)")
        unknown = set(config) - {"url", "package", "cache_seconds", "timeout", "token_env"}
        if unknown:
            raise ConfigError(f"unknown authority options {sorted(unknown)}")
        token_env = config.pop("token_env", None)
        if token_env:
            if not os.environ.get(token_env):
                raise ConfigError(f"authority kind opa: ${token_env} (its bearer token) is not set")
            config["token"] = os.environ[token_env]
        return OPAAuthority(config.pop("url"), **config)
    raise ConfigError(f"unknown authority kind {kind!r} (scopes or opa)")

