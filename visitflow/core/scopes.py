"""The scope grammar: the one place that knows what a visitflow scope string means.

The seed's "scope read data visit=a1" becomes the OAuth scope ``read:data:a1``.  Grammar
(docs/architecture.md §3)::

    <action>:<store>:<visit>[/<run>[/<analysis>]]   action ∈ {read, write}, store ∈ {data, raw, processed}
    run:<analysis>:<visit>               analysis may be ``*`` (any analysis)

``data`` means both stores.  A scope **covers** another when the action is equal, the store
is equal or ``data``, the visit is equal, the run is absent or equal, and (with a run) the
analysis is absent or equal.  Token exchange may
only *narrow*: every requested scope must be covered by a scope of the subject token.

Everything else (the IdP's exchange check, the Tiled authenticator and access policy, the
Prefect block's pre-flight check, the trigger) calls this module; nobody else parses scope
strings.  Strings that are not visitflow scopes (``openid``, ``profile``, tiled's own
``read:metadata``...) are kept as *opaque* scopes which only cover themselves.

Where a Tiled node sits in the visit/run hierarchy (path templates, ``Layout``) is
:mod:`visitflow.core.layout`, the same question asked from the other side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Union

from ..errors import ScopeError

__all__ = [ 'ACTIONS', 'STORES', 'CONCRETE_STORES', 'valid_name', 'check_name', 'DataScope',
    'RunScope', 'OpaqueScope', 'parse_scope', 'split_scope_string', 'ScopeSet',
    'GRANT_SCOPE_MODES', 'grant_scopes', 'data_token_scopes', 'ADMIN_SCOPE',
]

ACTIONS = ("read", "write")
STORES = ("data", "raw", "processed")
CONCRETE_STORES = ("raw", "processed")

#: The scope that makes a token an admin of visitflow's Tiled (creating visit containers,
#: reading everything); only the admin client is given it.
ADMIN_SCOPE = "visitflow:admin"

#: Visits, runs and analysis names: a conservative identifier charset.  ``:`` and ``/`` are
#: grammar separators, whitespace separates scopes, ``*`` is the analysis wildcard.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
_NAME_RE = re.compile(rf"^{_NAME}$")
_DATA_RE = re.compile(
    rf"^(?P<action>[a-z]+):(?P<store>[a-z]+):(?P<visit>{_NAME})(?:/(?P<run>{_NAME})(?:/(?P<analysis>{_NAME}))?)?$")
_RUN_RE = re.compile(rf"^run:(?P<analysis>\*|{_NAME}):(?P<visit>{_NAME})$")

Action = Literal["read", "write"]
Store = Literal["data", "raw", "processed"]


def valid_name(name: str) -> bool:
    """True if ``name`` may be used as a visit, run id or analysis name."""
    return bool(_NAME_RE.match(name or ""))


def check_name(name: str, what: str) -> str:
    if not valid_name(name):
        raise ScopeError(
            f"invalid {what} {name!r}: must match {_NAME} (letters, digits, '.', '_', '-')"
        )
    return name


@dataclass(frozen=True, order=True)
class DataScope:
    """``<action>:<store>:<visit>[/<run>[/<analysis>]]`` — read or write one store (or both) of
    a visit, one run of it, or one analysis's results of a run (``processed/<visit>/<run>/<analysis>``:
    what a data token writes, so one analysis cannot touch another's results)."""

    action: str
    store: str
    visit: str
    run: str | None = None
    analysis: str | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ScopeError(f"unknown action {self.action!r} (expected one of {ACTIONS})")
        if self.store not in STORES:
            raise ScopeError(f"unknown store {self.store!r} (expected one of {STORES})")
        check_name(self.visit, "visit")
        if self.run is not None:
            check_name(self.run, "run id")
        if self.analysis is not None:
            if self.run is None or self.store != "processed":
                raise ScopeError("only processed results belong to an analysis: "
                                 "<action>:processed:<visit>/<run>/<analysis>")
            check_name(self.analysis, "analysis name")

    def __str__(self) -> str:
        base = f"{self.action}:{self.store}:{self.visit}"
        if self.analysis:
            return f"{base}/{self.run}/{self.analysis}"
        return f"{base}/{self.run}" if self.run else base

    def covers(self, other: "Scope") -> bool:
        if not isinstance(other, DataScope):
            return False
        return (
            self.action == other.action
            and (self.store == other.store or self.store == "data")
            and self.visit == other.visit
            and (self.run is None or self.run == other.run)
            and (self.run is None or self.analysis is None or self.analysis == other.analysis)
        )


@dataclass(frozen=True, order=True)
class RunScope:
    """``run:<analysis>:<visit>`` — may start ``analysis`` for ``visit`` (``*`` = any)."""

    analysis: str
    visit: str

    def __post_init__(self):
        if self.analysis != "*":
            check_name(self.analysis, "analysis name")
        check_name(self.visit, "visit")

    def __str__(self) -> str:
        return f"run:{self.analysis}:{self.visit}"

    def covers(self, other: "Scope") -> bool:
        return (
            isinstance(other, RunScope)
            and self.visit == other.visit
            and (self.analysis == "*" or self.analysis == other.analysis)
        )


@dataclass(frozen=True, order=True)
class OpaqueScope:
    """Any other scope string (``openid``, tiled's own scopes...): covers only itself."""

    value: str

    def __str__(self) -> str:
        return self.value

    def covers(self, other: "Scope") -> bool:
        return isinstance(other, OpaqueScope) and other.value == self.value


Scope = Union[DataScope, RunScope, OpaqueScope]


def parse_scope(text: str) -> Scope:
    """Parse one scope string.

    Strings whose first field is ``read``, ``write`` or ``run``, or whose second field is a
    store, are visitflow scopes and must follow the grammar (``ScopeError`` otherwise) — except tiled's own ``read:metadata``,
    ``read:data``, ``write:metadata``, ``write:data`` which have no visit and stay opaque.
    """
    if not text or any(c.isspace() for c in text):
        raise ScopeError(f"invalid scope {text!r}: empty or contains whitespace")
    fields = text.split(":")
    head = fields[0]
    if head == "run":
        m = _RUN_RE.match(text)
        if not m:
            raise ScopeError(f"invalid scope {text!r}: expected run:<analysis>:<visit>")
        return RunScope(m["analysis"], m["visit"])
    if len(fields) >= 3 and (head in ACTIONS or fields[1] in STORES):
        m = _DATA_RE.match(text)
        if not m:
            raise ScopeError(
                f"invalid scope {text!r}: expected <read|write>:<data|raw|processed>:<visit>[/<run>[/<analysis>]]"
            )
        return DataScope(m["action"], m["store"], m["visit"], m["run"], m["analysis"])  # checks action/store
    return OpaqueScope(text)


def split_scope_string(scope: str | Iterable[str] | None) -> list[str]:
    """The OAuth ``scope`` claim is space separated; accept a list too (Keycloak ``scp``)."""
    if scope is None:
        return []
    if isinstance(scope, str):
        return scope.split()
    return [s for item in scope for s in str(item).split()]


@dataclass(frozen=True)
class ScopeSet:
    """The scopes of one token, parsed, with the questions every component asks of them."""

    scopes: frozenset = field(default_factory=frozenset)

    @classmethod
    def parse(cls, scope: str | Iterable[str] | None) -> "ScopeSet":
        return cls(frozenset(parse_scope(s) for s in split_scope_string(scope)))

    @classmethod
    def lenient(cls, scope: str | Iterable[str] | None) -> "ScopeSet":
        """Parse, dropping malformed visitflow scopes instead of raising.

        Used when *reading* a token that a trusted issuer already signed: a malformed scope
        grants nothing rather than making the whole token unusable.
        """
        out = set()
        for s in split_scope_string(scope):
            try:
                out.add(parse_scope(s))
            except ScopeError:
                pass
        return cls(frozenset(out))

    def __iter__(self):
        return iter(sorted(self.scopes, key=str))

    def __or__(self, other: "ScopeSet") -> "ScopeSet":
        return ScopeSet(self.scopes | other.scopes)

    def __len__(self) -> int:
        return len(self.scopes)

    def __str__(self) -> str:
        return " ".join(sorted(str(s) for s in self.scopes))

    def covers(self, scope: Scope | str) -> bool:
        if isinstance(scope, str):
            scope = parse_scope(scope)
        return any(mine.covers(scope) for mine in self.scopes)

    def uncovered(self, requested: "ScopeSet | str | Iterable[str]") -> list[Scope]:
        """The requested scopes this set does not cover (empty list = a valid narrowing)."""
        if not isinstance(requested, ScopeSet):
            requested = ScopeSet.parse(requested)
        return [s for s in requested if not self.covers(s)]

    def narrows_to(self, requested: "ScopeSet | str | Iterable[str]") -> bool:
        return not self.uncovered(requested)

    def allows(self, action: str, store: str, visit: str, run: str | None = None,
               analysis: str | None = None) -> bool:
        """May this token do ``action`` on ``store`` for (visit, run[, analysis])?

        ``run=None`` asks about the visit as a whole (e.g. creating a new run container
        under it), which only a visit-wide scope grants; ``analysis=None`` about the whole run.
        """
        return self.covers(DataScope(action, store, visit, run, analysis if run is not None else None))

    def allows_some(self, action: str, store: str, visit: str, run: str) -> bool:
        """May this token do ``action`` on *some part* of ``run`` (e.g. one analysis's results)?
        Such a token may see the run container and create it (docs/architecture.md §3)."""
        return any(
            isinstance(s, DataScope) and s.action == action and s.visit == visit
            and (s.store == store or s.store == "data") and (s.run is None or s.run == run)
            for s in self.scopes
        )

    def may_run(self, analysis: str, visit: str) -> bool:
        return self.covers(RunScope(analysis, visit))

    def touches(self, store: str, visit: str) -> bool:
        """True if any data scope (read or write, any run) concerns ``store`` of ``visit``.

        A principal that may act on *some* run of a visit may see that the visit container
        exists (to traverse to its run); listing shows it only its runs.
        """
        return any(
            isinstance(s, DataScope)
            and s.visit == visit
            and (s.store == store or s.store == "data")
            for s in self.scopes
        )

    def runs(self, store: str, visit: str, action: str = "read") -> set[str] | None:
        """The runs of ``visit`` in ``store`` this set may ``action``.

        Returns ``None`` when a visit-wide scope grants every run, else the set of run ids
        (possibly empty).
        """
        found: set[str] = set()
        for s in self.scopes:
            if (
                isinstance(s, DataScope)
                and s.action == action
                and s.visit == visit
                and (s.store == store or s.store == "data")
            ):
                if s.run is None:
                    return None
                found.add(s.run)
        return found

    def visits(self, store: str | None = None) -> set[str]:
        """Visits this set has any data scope on (in ``store``, or any store)."""
        return {
            s.visit
            for s in self.scopes
            if isinstance(s, DataScope)
            and (store is None or s.store == store or s.store == "data")
        }

    def data_scopes(self) -> list[DataScope]:
        return [s for s in self if isinstance(s, DataScope)]


#: How narrowly a delegation is scoped (the IdP decides what is possible):
#:
#: ``run``   one run — the design (docs/architecture.md §2): T_grant/T_data name
#:           ``<visit>/<run>``.
#:           Needs an IdP that mints per-run scopes (the dev IdP; an exchange service).
#: ``visit`` the visit's data — for IdPs whose scopes are a fixed list, such as Keycloak's
#:           client scopes (docs/production.md §3).  Tiled still stops the flow at the visit
#:           boundary and the flow reads only its run by construction, but a compromised
#:           analysis could read the visit's other runs.  Opt-in, recorded in provenance.
GRANT_SCOPE_MODES = ("run", "visit")


def _check_mode(per: str) -> str:
    if per not in GRANT_SCOPE_MODES:
        raise ScopeError(f"grant scope must be one of {GRANT_SCOPE_MODES}, not {per!r}")
    return per


def grant_scopes(analysis: str, visit: str, run: str, per: str = "run") -> ScopeSet:
    """T_grant's scopes (docs/architecture.md §2 step 3): run the analysis, read the raw run,
    write that analysis's results of the run (``per="visit"``: the visit's data, see
    GRANT_SCOPE_MODES)."""
    return ScopeSet(frozenset({RunScope(analysis, visit), *data_token_scopes(visit, run, per, analysis)}))


def data_token_scopes(visit: str, run: str, per: str = "run", analysis: str | None = None) -> ScopeSet:
    """T_data's scopes (docs/architecture.md §2 step 5): the grant minus the right to start
    analyses — ``write:processed:<visit>/<run>/<analysis>`` when the analysis is named (an
    older run-wide grant, ``write:processed:<visit>/<run>``, covers it, so it still works)."""
    if _check_mode(per) == "visit":
        return ScopeSet(frozenset({DataScope("read", "data", visit), DataScope("write", "data", visit)}))
    return ScopeSet(
        frozenset({DataScope("read", "raw", visit, run), DataScope("write", "processed", visit, run, analysis)})
    )
