"""Keycloak's standard token exchange (V2) scope rules, as observed on Keycloak 26.7.3.

The dev IdP applies these when started with ``fixed_scopes: true`` so that grant_scope=visit
can be tried without Keycloak; ``tests/token_service/test_keycloak_parity.py`` sends the same requests to a
real Keycloak (our realm) and to the dev IdP in this mode and compares the outcomes.

What Keycloak did with each requested scope (tests/token_service/test_keycloak.py records it):

* a scope that is not one of the requester's client scopes (default or optional) — every
  run-specific scope such as ``read:raw:a1/<run>`` — makes the whole request fail with
  ``invalid_scope`` ("Invalid scopes: ...");
* a client scope whose role the *user* lacks (``read:data:a2`` for alice) is dropped
  silently;
* a client scope the user holds is granted even if the subject token does not carry it: the
  exchange is bounded by the user's roles, not by the subject token;
* no ``scope`` parameter means the requester's default client scopes only: none of ours.

Pure functions over :class:`~visitflow.token_service.config.IdPConfig`; the HTTP errors are the
server's.
"""

from __future__ import annotations

from ..core.scopes import ScopeSet
from .config import IdPConfig

#: Client scopes every client has by default in our realm; ``openid`` is Keycloak's own.
#: Only ``openid`` appears in a token's ``scope`` claim (the others have
#: ``include.in.token.scope: false``).
BUILTIN_SCOPES = frozenset({"openid", "profile", "basic"})
IN_TOKEN_BUILTINS = frozenset({"openid"})


def client_scope_names(config: IdPConfig) -> set[str]:
    """The realm's client scopes: every scope a user or service account can hold, literally."""
    names = {str(s) for u in config.users.values() for s in u.scopes}
    names |= {s for c in config.clients.values() for s in c.scopes}
    return names | BUILTIN_SCOPES


def principal_scopes(config: IdPConfig, sub: str) -> set[str]:
    """What the subject holds by role: a user's scopes, or a service account's client scopes."""
    user = config.users.get(sub)
    if user is not None:
        return {str(s) for s in user.scopes}
    prefix = "service-account-"
    if sub.startswith(prefix) and sub[len(prefix):] in config.clients:
        return set(config.clients[sub[len(prefix):]].scopes)
    return set()


def exchange_scopes(config: IdPConfig, sub: str, requested: str | None) -> tuple[ScopeSet, list[str]]:
    """(granted scopes, unknown scopes) for an exchange by ``sub``'s token asking ``requested``.

    Unknown scopes non-empty means Keycloak refuses the request (``invalid_scope``)."""
    words = (requested or "").split()
    known = client_scope_names(config)
    unknown = [w for w in words if w not in known]
    if unknown:
        return ScopeSet.lenient([]), unknown
    held = principal_scopes(config, sub) | IN_TOKEN_BUILTINS
    return ScopeSet.lenient([w for w in dict.fromkeys(words) if w in held]), []


__all__ = ["BUILTIN_SCOPES", "client_scope_names", "exchange_scopes", "principal_scopes"]
