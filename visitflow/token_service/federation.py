"""The token service's production mode: federate the facility IdP, ask the authority.

In production ``visitflow idp`` is not an IdP: users log in at the facility's IdP (Keycloak)
and nobody has a password here.  What it keeps is the token service
(docs/architecture.md §2 steps 3 and 5): it accepts the facility IdP's access tokens as RFC
8693 *subject tokens*, asks the authority (:mod:`visitflow.core.authority`, OPA at a
facility) whether the subject may have what is asked for, and mints the run-bound T_grant
and T_data with ``act`` naming the actor.

Rules this module owns (config key ``federation`` of the token service YAML):

* **Trust**: a subject token is accepted from the token service itself (T_grant → T_data) or
  from an issuer listed under ``federation.issuers`` — validated by
  :class:`visitflow.core.tokens.TokenValidator` (discovery + JWKS, RS256 only, ``typ``, required
  claims, ``aud`` must name the requesting client as Keycloak's exchange requires).  Any
  other issuer is ``invalid_token`` "issuer … is not trusted"; nothing is decoded unverified
  beyond reading ``iss`` to pick the validator.
* **Authority for federated subjects**: a facility token carries identity, not visit scopes,
  so the requested scope must be given and every scope of it is put to the authority
  (:func:`visitflow.core.authority.decide_scopes`).  A refusal is ``access_denied`` with the
  authority's reason; an authority that cannot answer is **503** ``temporarily_unavailable``
  with the reason — fail closed, never a 500, nothing minted.
* **Re-check at the second hop**: exchanging a T_grant for T_data, and refreshing T_data,
  narrow as before *and* ask the authority again for the data scopes, so a subject removed
  from a session loses running delegations within the authority's cache window.
* **Lifetimes**: T_grant's lifetime is the token service's configuration (long enough for a
  queued post run): it is the authority's answer, not a copy of the facility token, whose
  5-minute lifetime would make queued post runs impossible.  Tokens minted from our *own*
  subject tokens (T_data, its refreshes) never outlive that subject (``exp`` ≤ the grant's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import jwt

from ..core.authority import Authority, Subject, authority_from_config, decide_scopes
from ..errors import AuthorityUnavailable, ConfigError, InvalidToken, OAuthError, ScopeError
from ..core.scopes import ScopeSet
from ..core.tokens import TokenValidator, unverified_claims

__all__ = ['IDENTITY_CLAIMS', 'subject_refused', 'requested_scopes',
    'TrustedIssuer', 'unavailable', 'Federation', 'identity_extra',
]

log = logging.getLogger("visitflow.idp.federation")

#: Identity claims carried from the facility token into T_grant and T_data (provenance, and
#: what the authority is asked about at the second hop).
IDENTITY_CLAIMS = ("preferred_username", "fedid")


@dataclass(frozen=True)
class TrustedIssuer:
    issuer: str
    jwks_uri: Optional[str] = None
    leeway: float = 10.0


def unavailable(exc: AuthorityUnavailable) -> OAuthError:
    """The authority gave no answer: 503, RFC 6749's ``temporarily_unavailable``."""
    return OAuthError("temporarily_unavailable", f"cannot ask the authority: {exc}", 503,
                      {"Retry-After": "5"})


def subject_refused(exc: InvalidToken) -> OAuthError:
    """A subject token that failed verification: 401 ``invalid_token`` with the reason -- but
    503 ``temporarily_unavailable`` when the facility IdP's keys could not be fetched (its
    discovery or JWKS did not answer).  Nothing is known to be wrong with the token then, and
    the difference matters to the trigger: it retries a 5xx while the user's token lives and
    then records Failed runs with the recovery command (visitflow/trigger/outage.py), but takes
    a 401 as a final refusal and records nothing to recover."""
    if exc.code == "keys_unavailable":
        return OAuthError("temporarily_unavailable", f"subject_token: {exc.reason}", 503, {"Retry-After": "5"})
    return OAuthError("invalid_token", f"subject_token: {exc.reason}", 401)


def requested_scopes(requested: Optional[str], missing: str) -> ScopeSet:
    """The ``scope`` parameter of a federated request, parsed; ``invalid_scope`` (403) with
    ``missing`` when there is none, or with the parse error -- never a 500."""
    if not requested or not requested.strip():
        raise OAuthError("invalid_scope", missing, 403)
    try:
        return ScopeSet.parse(requested)
    except ScopeError as exc:
        raise OAuthError("invalid_scope", str(exc), 403) from exc


class Federation:
    """Trusted issuers of subject tokens + the authority the token service asks."""

    def __init__(self, issuers: list[TrustedIssuer], authority: Authority):
        if not issuers:
            raise ConfigError("federation needs at least one trusted issuer (the facility IdP)")
        self.issuers = {i.issuer.rstrip("/"): i for i in issuers}
        self.authority = authority
        self._validators = {
            iss: TokenValidator(iss, [], jwks_uri=i.jwks_uri, leeway=i.leeway) for iss, i in self.issuers.items()
        }

    @classmethod
    def from_config(cls, d: dict) -> "Federation":
        d = dict(d or {})
        unknown = set(d) - {"issuers", "authority"}
        if unknown:
            raise ConfigError(f"federation: unknown keys {sorted(unknown)}")
        issuers = []
        for item in d.get("issuers") or []:
            item = {"issuer": item} if isinstance(item, str) else dict(item)
            bad = set(item) - {"issuer", "jwks_uri", "leeway"}
            if bad or "issuer" not in item:
                raise ConfigError(f"federation.issuers: each needs issuer (and optionally jwks_uri, leeway), got {item}")
            issuers.append(TrustedIssuer(item["issuer"].rstrip("/"), item.get("jwks_uri"), float(item.get("leeway", 10))))
        return cls(issuers, authority_from_config(d.get("authority")))

    # -- subject tokens ----------------------------------------------------------------
    @staticmethod
    def issuer_of(token: str) -> str:
        """``iss`` of a token, read only to choose its validator (which then verifies it)."""
        try:
            claims = unverified_claims(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}", code="malformed") from exc
        iss = claims.get("iss")
        return iss.rstrip("/") if isinstance(iss, str) else ""

    def trusts(self, issuer: str) -> bool:
        return issuer in self._validators

    def validate_subject(self, token: str, issuer: str, client_id: str) -> dict:
        """Verify a facility token; its ``aud`` must name the requesting client."""
        validator = self._validators.get(issuer)
        if validator is None:
            raise InvalidToken(f"issuer {issuer or '(none)'} is not trusted by this token service", code="wrong_issuer")
        try:
            return validator.validate(token, audience=client_id).raw
        except InvalidToken:
            raise
        except Exception as exc:  # discovery of a trusted issuer failed: say so, never a 500
            raise InvalidToken(f"cannot verify tokens of {issuer} now: {type(exc).__name__}",
                               code="keys_unavailable") from exc

    # -- the authority -----------------------------------------------------------------
    def mint_scopes(self, subject: dict, requested: Optional[str]) -> ScopeSet:
        """The scopes a federated subject gets: exactly those requested, if the authority
        allows every one (``access_denied`` with its reason otherwise)."""
        scopes = requested_scopes(requested, "a facility token carries no visit scopes: request the "
                                  "run:<analysis>:<visit> and data scopes to be decided by the authority")
        self.require(subject, scopes)
        return scopes

    def require(self, subject: dict, scopes: ScopeSet) -> None:
        """Ask the authority about every scope; refuse with its reason, 503 if it cannot answer."""
        try:
            decision = decide_scopes(self.authority, Subject.from_claims(subject), scopes)
        except AuthorityUnavailable as exc:
            log.warning("authority unavailable: %s", exc)
            raise unavailable(exc) from exc
        if not decision.allow:
            raise OAuthError("access_denied", f"the authority refused: {decision.reason}", 403)

    def recheck(self, subject: dict, scopes: ScopeSet) -> None:
        """Second hop (T_grant → T_data, refresh): the data scopes only (running an analysis
        was decided when the grant was minted)."""
        data = ScopeSet(frozenset(scopes.data_scopes()))
        if len(data):
            self.require(subject, data)


def identity_extra(subject: dict) -> dict:
    """Identity claims to copy into tokens minted for ``subject``."""
    return {k: subject[k] for k in IDENTITY_CLAIMS if k in subject}
