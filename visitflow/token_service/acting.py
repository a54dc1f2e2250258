"""Staff recovery: facility staff start a user's analysis of one run, acting for the user.

Why it exists: after an IdP outage longer than the user's token lives, the trigger records the
run's analyses in Prefect as Failed (visitflow/trigger/outage.py).  The user may have left the
beamline; the staff on shift should be able to finish the job — with *their own* login, not
with the trigger's confidential ``blueapi`` secret, and visibly as themselves.

The request (RFC 8693 token exchange, with Keycloak's ``requested_subject`` parameter, from a
client configured ``act_for: true`` — ``visitflow-staff`` in deployments/token-service.yaml, a
public client: the staff member's own token is the credential)::

    grant_type=urn:ietf:params:oauth:grant-type:token-exchange
    subject_token=<the staff member's facility access token>   (aud must name the client)
    requested_subject=<the user, as the user office knows them> audience=visitflow
    scope=run:<analysis>:<visit> read:raw:<visit>/<run> write:processed:<visit>/<run>

What is decided, in order, every refusal with its reason (403, never a 500):

1. the staff token is a facility IdP token (federation: discovery + JWKS; our own grants are
   never accepted here: a grant cannot be turned into a staff credential);
2. the scope is **one run's**: every scope names the same visit, data scopes the same run, at
   least one ``run:`` scope — so a staff recovery can never be visit-wide (``invalid_scope``);
3. the authority (OPA, action ``act_for``) says this staff member may act for this user on this
   visit: beamline staff of the session's beamline, the user a member (``access_denied``);
4. the authority says **the user** may hold every requested scope (the ordinary decision):
   staff never widen what the user could have had.

The grant minted: ``sub`` the user, ``preferred_username`` the user, ``act: {"sub": <staff>}``
(RFC 8693 §4.1; the T_data exchanged from it nests it: ``{"sub": "visitflow", "act": {...}}``),
the ordinary grant lifetime.  Its refreshes and second hop ask the authority again for the
user, exactly as for a grant the trigger obtained.

Every decision is logged at WARNING (staff acting for a user is rare and privileged: it shows
at the production log level, with the staff member, the user and the visit).

Limit (stated, not hidden): the user is named as the authority knows them (fedid or username);
the grant's ``sub`` is that name.  Where the facility IdP's ``sub`` is an opaque id (Keycloak's
UUIDs) the grant's ``sub`` therefore differs from the user's own tokens' ``sub``; Tiled's
decisions (scopes, and OPA by fedid/username) are unaffected.
"""

from __future__ import annotations

import logging

from ..core.authority import Subject
from ..core.scopes import DataScope, RunScope, ScopeSet
from ..errors import AuthorityUnavailable, InvalidToken, OAuthError
from .federation import Federation, requested_scopes, subject_refused, unavailable

__all__ = ["one_run", "decide_acting"]

log = logging.getLogger("visitflow.idp.acting")


def one_run(requested: str | None) -> tuple[ScopeSet, str]:
    """The requested scopes and their visit, if they are one run's; ``invalid_scope`` otherwise."""
    scopes = requested_scopes(requested, "staff recovery needs the run's scopes: run:<analysis>:<visit> "
                              "read:raw:<visit>/<run> write:processed:<visit>/<run>")
    visits = {s.visit for s in scopes if isinstance(s, (RunScope, DataScope))}
    runs = {s.run for s in scopes if isinstance(s, DataScope)}
    problems = []
    if any(not isinstance(s, (RunScope, DataScope)) for s in scopes):
        problems.append("only run: and data scopes")
    if len(visits) != 1:
        problems.append(f"one visit (asked for {len(visits)})")
    if None in runs or len(runs) > 1:
        problems.append("every data scope of one run (<visit>/<run>), never a whole visit")
    if not any(isinstance(s, RunScope) for s in scopes):
        problems.append("a run:<analysis>:<visit> scope")
    if problems:
        raise OAuthError("invalid_scope", "staff act for a user on one run only: needs " + "; ".join(problems), 403)
    return scopes, visits.pop()


def decide_acting(federation: Federation | None, client_id: str, staff_token: str, for_user: str,
                  requested: str | None) -> tuple[dict, ScopeSet, dict]:
    """(the staff member's verified claims, the scopes to mint, the user's identity claims);
    raises :class:`OAuthError` with the reason for every refusal (module docstring)."""
    if federation is None:
        raise OAuthError("unauthorized_client", "acting for a user needs the production token service "
                         "(federation and an authority)", 403)
    if not for_user or not for_user.strip():
        raise OAuthError("invalid_request", "requested_subject names the user to act for")
    try:
        issuer = federation.issuer_of(staff_token)
        if not federation.trusts(issuer):
            raise InvalidToken(f"issuer {issuer or '(none)'} is not the facility IdP: staff act with their own "
                               "facility login", code="wrong_issuer")
        staff = federation.validate_subject(staff_token, issuer, client_id)
    except InvalidToken as exc:
        raise subject_refused(exc) from exc
    scopes, visit = one_run(requested)
    actor = Subject.from_claims(staff)
    try:
        decision = federation.authority.may_act_for(actor, for_user, visit)
    except AuthorityUnavailable as exc:
        raise unavailable(exc) from exc
    if not decision.allow:
        log.warning("act_for refused: staff=%s user=%s visit=%s: %s", actor.name, for_user, visit, decision.reason)
        raise OAuthError("access_denied", f"the authority refused: {decision.reason}", 403)
    user = {"sub": for_user, "preferred_username": for_user}
    federation.require(user, scopes)        # the user's own authority bounds what staff get
    log.warning("act_for: staff=%s acts for user=%s on visit %s: %s", actor.name, for_user, visit, scopes)
    return staff, scopes, user
