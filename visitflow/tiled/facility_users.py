"""Facility users in Tiled: their own tokens come from the facility IdP and carry identity,
not visit scopes, so the authority decides what they may see and write
(docs/architecture.md §4).

Two kinds of bearer token reach a production Tiled:

* **run tokens** (T_data) from the token service: their scopes *are* the authority's answer,
  given when the grant was minted; the policy checks them as before;
* **user tokens** from the facility IdP (Keycloak), e.g. Alice browsing her session or
  blueapi's TiledWriter writing with her token: validated against that issuer's JWKS (audience
  ``tiled``), marked with :data:`USER_SCOPE`, and on each node the policy asks the authority
  (:mod:`visitflow.core.authority`) "may this user read/write store T of visit V?" — cached
  briefly, so a membership change takes effect within ``cache_seconds``; an authority that
  cannot answer is a 503, never an allow.

The answer is turned into visit-wide data scopes (``read:raw:a1``...), so the one set of
node rules in :mod:`.access_policy` applies to both kinds of token.

A beamline's blueapi service account (Keycloak client credentials) is a facility "user" whose
token carries a ``beamline`` claim; the authority matches it (deployments/opa/authz.rego).
Tiled keeps only a principal's identity name, so the claim rides in the principal's scopes as
:data:`BEAMLINE_SCOPE_PREFIX` ``<beamline>`` (put there only by :func:`claims_for_tiled`, from a
verified facility token) and :func:`subject_of` hands it back to the authority.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

from fastapi import HTTPException

from ..core.authority import Authority, Subject
from ..errors import AuthorityUnavailable
from ..core.scopes import DataScope, ScopeSet
from ..core.layout import Location
from ..core.tokens import Claims

__all__ = [ 'USER_SCOPE', 'USER_TILED_SCOPES', 'BEAMLINE_SCOPE_PREFIX', 'user_name', 'claims_for_tiled',
    'is_facility_user', 'subject_of', 'scopes_for',
]

#: Put by the authenticator on principals whose token came from the facility IdP (never
#: taken from a token: the authenticator passes on only data scopes and the admin scope).
USER_SCOPE = "visitflow:facility-user"
#: Tiled's coarse scopes for facility users: they open the door; the policy decides per node.
#: Carries a verified facility token's ``beamline`` claim to the authority (see the module docstring).
BEAMLINE_SCOPE_PREFIX = "visitflow:beamline:"
_BEAMLINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
USER_TILED_SCOPES = frozenset({"read:metadata", "read:data", "write:metadata", "write:data", "create:node"})


def user_name(claims: dict) -> str:
    """The user office identifier, with the policy's precedence: fedid, username, sub."""
    return str(claims.get("fedid") or claims.get("preferred_username") or claims["sub"])


def claims_for_tiled(claims: Claims, subject_uuid: str) -> dict[str, Any]:
    """The decoded-token dict Tiled consumes for a facility user (cf. the authenticator's)."""
    raw = claims.raw
    scopes = set(USER_TILED_SCOPES | {USER_SCOPE})
    beamline = raw.get("beamline")
    if isinstance(beamline, str) and _BEAMLINE.fullmatch(beamline):
        scopes.add(BEAMLINE_SCOPE_PREFIX + beamline)
    out = {"sub": subject_uuid, "user": user_name(raw), "scope": " ".join(sorted(scopes)),
           "iss": raw.get("iss"), "exp": raw.get("exp"), "iat": raw.get("iat")}
    for k in ("azp", "jti"):
        if k in raw:
            out[k] = raw[k]
    return out


def is_facility_user(authn_scopes: Optional[Iterable[str]]) -> bool:
    return USER_SCOPE in set(authn_scopes or ())


def subject_of(principal, authn_scopes: Optional[Iterable[str]] = None) -> Subject:
    identities = getattr(principal, "identities", None) or []
    if not identities:
        return Subject({})
    claims = {"preferred_username": identities[0].id}
    beamlines = sorted(s[len(BEAMLINE_SCOPE_PREFIX):] for s in authn_scopes or () if s.startswith(BEAMLINE_SCOPE_PREFIX))
    if len(beamlines) == 1:
        claims["beamline"] = beamlines[0]
    return Subject(claims)


def _unavailable(exc: AuthorityUnavailable) -> HTTPException:
    return HTTPException(status_code=503, detail=f"cannot ask the authority: {exc}", headers={"Retry-After": "5"})


async def scopes_for(authority: Authority, principal, locations: list[Location], *, listing: bool,
                     authn_scopes: Optional[Iterable[str]] = None) -> ScopeSet:
    """The facility user's rights at these node locations, as visit-wide data scopes.

    Visit-level questions only: session members may see every run of their session.  With
    ``listing`` above the visit level, the visits the user may read (to filter a listing).
    """
    subject = subject_of(principal, authn_scopes)
    out: set = set()
    try:
        for loc in locations:
            if loc.visit is None:
                if listing:
                    for visit in await authority.areadable_visits(subject):
                        out.add(DataScope("read", loc.store, visit))
                continue
            for action in ("read", "write"):
                if (await authority.amay_access(subject, action, loc.store, loc.visit)).allow:
                    out.add(DataScope(action, loc.store, loc.visit))
    except AuthorityUnavailable as exc:
        raise _unavailable(exc) from exc
    return ScopeSet(frozenset(out))
