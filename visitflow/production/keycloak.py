"""Does the Keycloak realm export say the same as the dev IdP's YAML?

``compare(realm, idp_config)`` returns human-readable differences (``[]`` = in step) between
``deployments/keycloak/realm.json`` and ``deployments/idp.yaml``: the same clients (public or
confidential, grants), the same audiences (who gets which ``aud``, and who may exchange for
which audience), the same user scopes and the same lifetimes.  ``limitations()`` lists what
Keycloak cannot express the way the dev IdP does, so docs and tests can say it out loud.

How each dev-IdP notion is realised in Keycloak (and therefore what is compared):

==========================  ==============================================================
dev IdP (idp.yaml)          Keycloak realm
==========================  ==============================================================
``public: true``            ``publicClient``
grant ``password``          ``directAccessGrantsEnabled``
grant ``client_credentials`` ``serviceAccountsEnabled``
grant token-exchange        attribute ``standard.token.exchange.enabled`` (V2, 26.2+)
grant ``refresh_token``     attribute ``use.refresh.tokens`` (Keycloak's default: on)
``exchange_refresh``        attribute ``standard.token.exchange.enableRefreshRequestedTokenType``
                            = ``SAME_SESSION``
``audiences``               the client's own ``oidc-audience-mapper`` s plus audience mappers
                            of its *default* client scopes
``exchange_audiences``      client roles held in the client's scope (``clientScopeMappings``)
                            resolved by an ``oidc-audience-resolve-mapper`` default scope, plus
                            audience mappers of its *optional* client scopes; V2's
                            ``audience`` parameter can only filter these
user ``scopes``             realm roles of the same name; a client scope of the same name,
                            role-gated (scope mapping to that role), included in the token's
                            ``scope``; default on the login client, optional on exchangers
client ``scopes``           the same, held by the client's service-account user
``lifetimes.access``        ``accessTokenLifespan``; per-audience overrides become the
                            ``access.token.lifespan`` of the client that *requests* such tokens
                            (Keycloak sets lifespans per client a token is issued to)
``lifetimes.refresh``       ``client.session.idle.timeout`` on refresh-issuing clients
                            (a Keycloak refresh token lives for the session idle timeout)
``lifetimes.session_max``   ``ssoSessionMaxLifespan``; and ``ssoSessionIdleTimeout`` equal to
                            it, because Keycloak refuses to exchange a token whose *user
                            session* has idled out -- a queued post run must not depend on
                            the user clicking around
``lifetimes.id_token``      Keycloak gives ID tokens the access token's expiry: must be equal
==========================  ==============================================================

Pure functions over plain dicts (json/yaml loaded); scope strings are parsed by
:mod:`visitflow.core.scopes` only.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..token_service.config import TOKEN_EXCHANGE, IdPConfig
from ..core.scopes import OpaqueScope, parse_scope
from ..errors import ScopeError

__all__ = [
    'BUILTIN_CLIENTS', 'EXCHANGE_ENABLED', 'EXCHANGE_REFRESH', 'DOWNSCOPE_EXECUTOR',
    'client_audiences', 'exchange_audiences', 'token_scopes_for_roles', 'compare', 'limitations',
]

#: Clients Keycloak creates in every realm; not part of our configuration.
BUILTIN_CLIENTS = frozenset({
    "account", "account-console", "admin-cli", "broker", "realm-management",
    "security-admin-console",
})
EXCHANGE_ENABLED = "standard.token.exchange.enabled"
EXCHANGE_REFRESH = "standard.token.exchange.enableRefreshRequestedTokenType"
DOWNSCOPE_EXECUTOR = "downscope-assertion-grant-enforcer"


# ------------------------------------------------------------------ reading the realm


def _attr(client: dict, name: str, default: str | None = None) -> str | None:
    return (client.get("attributes") or {}).get(name, default)


def _true(value: Any) -> bool:
    return str(value).lower() == "true"


def _scopes_by_name(realm: dict) -> dict[str, dict]:
    return {s["name"]: s for s in realm.get("clientScopes") or []}


def _audience_mappers(mappers: Iterable[dict]) -> set[str]:
    out = set()
    for m in mappers or []:
        if m.get("protocolMapper") != "oidc-audience-mapper":
            continue
        cfg = m.get("config") or {}
        if not _true(cfg.get("access.token.claim", "true")):
            continue
        aud = cfg.get("included.client.audience") or cfg.get("included.custom.audience")
        if aud:
            out.add(aud)
    return out


def _has_audience_resolve(client: dict, scopes: dict[str, dict]) -> bool:
    mappers = list(client.get("protocolMappers") or [])
    for name in client.get("defaultClientScopes") or []:
        mappers += (scopes.get(name) or {}).get("protocolMappers") or []
    return any(m.get("protocolMapper") == "oidc-audience-resolve-mapper" for m in mappers)


def client_audiences(realm: dict, client: dict) -> set[str]:
    """``aud`` of tokens issued to ``client`` for its own logins / client credentials."""
    scopes = _scopes_by_name(realm)
    out = _audience_mappers(client.get("protocolMappers"))
    for name in client.get("defaultClientScopes") or []:
        out |= _audience_mappers((scopes.get(name) or {}).get("protocolMappers"))
    return out


def exchange_audiences(realm: dict, client: dict) -> set[str]:
    """Audiences ``client`` can obtain by standard token exchange (empty if not enabled)."""
    if not _true(_attr(client, EXCHANGE_ENABLED)):
        return set()
    scopes = _scopes_by_name(realm)
    cid = client["clientId"]
    out = set()
    if _has_audience_resolve(client, scopes):
        for owner, mappings in (realm.get("clientScopeMappings") or {}).items():
            if any(m.get("client") == cid and m.get("roles") for m in mappings):
                out.add(owner)
    for name in client.get("optionalClientScopes") or []:
        out |= _audience_mappers((scopes.get(name) or {}).get("protocolMappers"))
    return out


def _scope_roles(realm: dict) -> dict[str, set[str]]:
    """client scope name -> realm roles it is gated by (scope mappings)."""
    out: dict[str, set[str]] = {}
    for m in realm.get("scopeMappings") or []:
        if m.get("clientScope"):
            out.setdefault(m["clientScope"], set()).update(m.get("roles") or [])
    return out


def _is_visitflow_scope(name: str) -> bool:
    try:
        return not isinstance(parse_scope(name), OpaqueScope)
    except ScopeError:
        return True  # claims to be one, malformed: reported by the caller


def token_scopes_for_roles(realm: dict, client_scope_names: Iterable[str], roles: set[str]) -> set[str]:
    """Scope strings a token carries from these client scopes for a principal with ``roles``
    (Keycloak applies a role-gated client scope only to holders of one of its roles)."""
    scopes = _scopes_by_name(realm)
    gates = _scope_roles(realm)
    out = set()
    for name in client_scope_names:
        s = scopes.get(name)
        if s is None or not _true((s.get("attributes") or {}).get("include.in.token.scope", "true")):
            continue
        gate = gates.get(name)
        if gate is None or gate & roles:
            out.add(name)
    return out


# ------------------------------------------------------------------------- comparing


def compare(realm: dict, idp_config: dict) -> list[str]:
    """Differences between a Keycloak realm export and the dev IdP's YAML; [] if none."""
    idp = IdPConfig.from_dict(idp_config)
    diffs: list[str] = []
    diffs += _compare_lifetimes(realm, idp)
    diffs += _compare_clients(realm, idp)
    diffs += _compare_users(realm, idp)
    diffs += _compare_scope_definitions(realm, idp)
    diffs += _compare_exchange_policy(realm, idp)
    return diffs


def _compare_lifetimes(realm: dict, idp: IdPConfig) -> list[str]:
    d = []
    base = idp.lifetimes

    def want(key: str, value: int, what: str):
        got = realm.get(key)
        if got != value:
            d.append(f"realm {key} is {got}, dev IdP {what} is {value}")

    want("accessTokenLifespan", base.access, "lifetimes.access")
    want("ssoSessionMaxLifespan", base.session_max, "lifetimes.session_max")
    want("ssoSessionIdleTimeout", base.session_max,
         "lifetimes.session_max (user sessions must not idle out before their maximum, or queued grants cannot be exchanged)")
    if base.id_token != base.access:
        d.append(f"dev IdP lifetimes.id_token ({base.id_token}) differs from lifetimes.access ({base.access}): "
                 "Keycloak gives ID tokens the access token's expiry")
    for aud, lt in idp.audiences.items():
        if lt.refresh != base.refresh or lt.id_token != base.id_token:
            d.append(f"dev IdP audience {aud}: per-audience refresh/id_token lifetimes have no Keycloak equivalent")
    return d


def _expected_lifespan(idp: IdPConfig, client) -> int:
    """Keycloak's single per-client access lifespan for what the dev IdP issues to ``client``.

    Exchanged tokens are what an exchanging client exists for, so their audience's lifetime
    wins; a conflict with its other tokens is reported by :func:`limitations`.
    """
    if client.exchange_audiences:
        return max(idp.lifetimes_for(a).access for a in client.exchange_audiences)
    return idp.lifetimes_for(list(client.audiences)).access


def _issues_refresh(idp: IdPConfig, client) -> bool:
    return "refresh_token" in client.grants and (
        "password" in client.grants or client.exchange_refresh)


def _only_on_one_side(kind: str, ours, realm) -> list[str]:
    """Names the dev IdP has and the realm lacks, and the other way round."""
    return ([f"{kind} {n}: in the dev IdP, missing from the realm" for n in sorted(set(ours) - set(realm))]
            + [f"{kind} {n}: in the realm, not in the dev IdP" for n in sorted(set(realm) - set(ours))])


def _compare_clients(realm: dict, idp: IdPConfig) -> list[str]:
    d = []
    kc = {c["clientId"]: c for c in realm.get("clients") or [] if c.get("clientId") not in BUILTIN_CLIENTS}
    d += _only_on_one_side("client", idp.clients, kc)
    for cid in sorted(set(idp.clients) & set(kc)):
        c, k = idp.clients[cid], kc[cid]
        p = f"client {cid}: "
        if not k.get("enabled", True):
            d.append(p + "disabled in the realm")
        if len(k.get("description") or "") > 255:
            d.append(p + "description is longer than 255 characters: Keycloak's realm import fails on it")
        if bool(k.get("publicClient")) != c.public:
            d.append(p + f"publicClient={k.get('publicClient')} but dev IdP public={c.public}")
        if not c.public and not k.get("secret"):
            d.append(p + "confidential but has no secret in the realm")
        if k.get("fullScopeAllowed", True):
            d.append(p + "fullScopeAllowed is on: every role and client audience of the user would reach its tokens")
        if not c.public and k.get("standardFlowEnabled", True):
            d.append(p + "confidential client with browser login (standardFlowEnabled); the dev IdP has none")
        if not _true(_attr(k, "access.token.header.type.rfc9068")):
            d.append(p + "access tokens would not carry typ at+jwt (attribute access.token.header.type.rfc9068)")

        grants = {
            "password": bool(k.get("directAccessGrantsEnabled")),
            "client_credentials": bool(k.get("serviceAccountsEnabled")),
            TOKEN_EXCHANGE: _true(_attr(k, EXCHANGE_ENABLED)),
            "refresh_token": _true(_attr(k, "use.refresh.tokens", "true")),
        }
        for grant, on in grants.items():
            if on != (grant in c.grants):
                d.append(p + f"grant {grant} is {'on' if on else 'off'} in the realm, "
                             f"{'on' if grant in c.grants else 'off'} in the dev IdP")
        if grants[TOKEN_EXCHANGE] and k.get("publicClient"):
            d.append(p + "public clients cannot use standard token exchange")
        refresh_mode = _attr(k, EXCHANGE_REFRESH, "NO")
        if (refresh_mode == "SAME_SESSION") != c.exchange_refresh:
            d.append(p + f"{EXCHANGE_REFRESH}={refresh_mode} but dev IdP exchange_refresh={c.exchange_refresh}")

        auds = client_audiences(realm, k)
        if auds != set(c.audiences):
            d.append(p + f"token audiences {sorted(auds)} in the realm, {sorted(c.audiences)} in the dev IdP")
        xauds = exchange_audiences(realm, k)
        if xauds != set(c.exchange_audiences):
            d.append(p + f"may exchange for audiences {sorted(xauds)} in the realm, "
                         f"{sorted(c.exchange_audiences)} in the dev IdP")

        want = _expected_lifespan(idp, c)
        got = int(_attr(k, "access.token.lifespan") or realm.get("accessTokenLifespan") or 0)
        if got != want:
            d.append(p + f"access tokens live {got} s in the realm, {want} s in the dev IdP")
        if _issues_refresh(idp, c):
            idle = int(_attr(k, "client.session.idle.timeout") or realm.get("ssoSessionIdleTimeout") or 0)
            realm_idle = int(realm.get("ssoSessionIdleTimeout") or 0)
            effective = min(idle, realm_idle) if realm_idle else idle
            refresh = idp.lifetimes_for(list(c.exchange_audiences or c.audiences)).refresh
            if effective != refresh:
                d.append(p + f"refresh tokens live {effective} s in the realm, {refresh} s in the dev IdP")

        if c.scopes or grants["client_credentials"]:
            d += _compare_service_account_scopes(realm, k, c)
    return d


def _compare_service_account_scopes(realm: dict, k: dict, c) -> list[str]:
    cid = k["clientId"]
    sa = [u for u in realm.get("users") or [] if u.get("serviceAccountClientId") == cid]
    roles = set(sa[0].get("realmRoles") or []) if sa else set()
    got = token_scopes_for_roles(realm, k.get("defaultClientScopes") or [], roles)
    got = {s for s in got if s not in ("openid", "profile", "email")}
    if got != set(c.scopes):
        return [f"client {cid}: client_credentials scopes {sorted(got)} in the realm, {sorted(c.scopes)} in the dev IdP"]
    return []


def _login_clients(idp: IdPConfig) -> list[str]:
    return [cid for cid, c in idp.clients.items() if "password" in c.grants]


def _compare_users(realm: dict, idp: IdPConfig) -> list[str]:
    d = []
    kc = {u["username"]: u for u in realm.get("users") or [] if not u.get("serviceAccountClientId")}
    clients = {c["clientId"]: c for c in realm.get("clients") or []}
    d += _only_on_one_side("user", idp.users, kc)
    for name in sorted(set(idp.users) & set(kc)):
        u, k = idp.users[name], kc[name]
        want = {str(s) for s in u.scopes}
        roles = set(k.get("realmRoles") or [])
        have = {r for r in roles if _is_visitflow_scope(r)}
        if have != want:
            d.append(f"user {name}: scopes {sorted(have)} in the realm, {sorted(want)} in the dev IdP")
        for cid in _login_clients(idp):
            got = token_scopes_for_roles(realm, (clients.get(cid) or {}).get("defaultClientScopes") or [], roles)
            got = {s for s in got if _is_visitflow_scope(s)}
            if got != want:
                d.append(f"user {name}: a login at {cid} would carry {sorted(got)}, the dev IdP gives {sorted(want)}")
        passwords = [c.get("value") for c in k.get("credentials") or [] if c.get("type") == "password"]
        if passwords != [u.password]:
            d.append(f"user {name}: demo password differs from the dev IdP's")
        if not k.get("enabled", True):
            d.append(f"user {name}: disabled in the realm")
    return d


def _compare_scope_definitions(realm: dict, idp: IdPConfig) -> list[str]:
    """Every visitflow scope is a role-gated client scope, offered where it must be."""
    d = []
    scopes = _scopes_by_name(realm)
    gates = _scope_roles(realm)
    realm_roles = {r["name"] for r in (realm.get("roles") or {}).get("realm") or []}
    clients = {c["clientId"]: c for c in realm.get("clients") or []}
    wanted = {str(s) for u in idp.users.values() for s in u.scopes} | {s for c in idp.clients.values() for s in c.scopes}
    for name in sorted(realm_roles | set(scopes)):
        if _is_visitflow_scope(name):
            try:
                parse_scope(name)
            except ScopeError as exc:
                d.append(f"realm defines malformed visitflow scope {name!r}: {exc}")
    for s in sorted(wanted):
        if s not in realm_roles:
            d.append(f"scope {s}: no realm role of that name")
        cs = scopes.get(s)
        if cs is None:
            d.append(f"scope {s}: no client scope of that name")
            continue
        if not _true((cs.get("attributes") or {}).get("include.in.token.scope", "true")):
            d.append(f"scope {s}: client scope is not included in the token's scope claim")
        if gates.get(s) != {s}:
            d.append(f"scope {s}: client scope must be gated by exactly the realm role {s}, is {sorted(gates.get(s) or [])}")
    user_scopes = {str(s) for u in idp.users.values() for s in u.scopes}
    for cid, c in idp.clients.items():
        k = clients.get(cid)
        if k is None:
            continue
        if "password" in c.grants:
            missing = user_scopes - set(k.get("defaultClientScopes") or [])
            if missing:
                d.append(f"client {cid}: user scopes not default at login: {sorted(missing)}")
        if TOKEN_EXCHANGE in c.grants:
            missing = user_scopes - set(k.get("optionalClientScopes") or [])
            if missing:
                d.append(f"client {cid}: cannot request user scopes in an exchange (not optional scopes): {sorted(missing)}")
            leaked = user_scopes & set(k.get("defaultClientScopes") or [])
            if leaked:
                d.append(f"client {cid}: user scopes as *default* scopes would be added to every exchanged token: {sorted(leaked)}")
    return d


def _compare_exchange_policy(realm: dict, idp: IdPConfig) -> list[str]:
    """No client policy may apply the downscope enforcer to token exchange.

    Observed on Keycloak 26.7.3 (tests/token_service/test_keycloak.py): ``downscope-assertion-grant-enforcer``
    also refuses every ``audience`` the subject token does not already carry ("Requested
    audience not available"), so neither hop of the chain (aud blueapi -> visitflow -> tiled)
    could work.  Narrowing is therefore the Block's job (it asks only for what the run needs
    and checks what it got), bounded by Keycloak's own rules: the requester's optional client
    scopes and the user's roles.
    """
    profiles = {
        p["name"] for p in (realm.get("clientProfiles") or {}).get("profiles") or []
        if any(e.get("executor") == DOWNSCOPE_EXECUTOR for e in p.get("executors") or [])
    }
    return [f"client policy {policy.get('name')}: {DOWNSCOPE_EXECUTOR} refuses every audience change, "
            "so no token exchange of the delegation chain would succeed"
            for policy in (realm.get("clientPolicies") or {}).get("policies") or []
            if policy.get("enabled", True) and set(policy.get("profiles") or []) & profiles]


# ----------------------------------------------------------------------- limitations


def limitations(realm: dict, idp_config: dict) -> list[str]:
    """What this realm cannot do the way the dev IdP does (not fixable by configuration)."""
    idp = IdPConfig.from_dict(idp_config)
    notes = [
        "no `act` claim: Keycloak's standard token exchange (V2) does not implement RFC 8693 "
        "delegation; provenance falls back to `azp` (the requesting client)",
        "run-specific scopes (read:raw:<visit>/<run>, write:processed:<visit>/<run>) and narrowing "
        "a wildcard (run:*:<visit>) to one analysis are not issuable: Keycloak only grants scopes "
        "that exist as client scopes and answers invalid_scope for any other (observed on 26.7.3); "
        "deploy with grant_scope=visit on the trigger and the block (visit-wide grants)",
        "a requested client scope the user lacks the role for is left out of the token rather than "
        "refused: callers must check the granted `scope` (the Block does, at the grant and at each "
        "data-token exchange)",
        "an exchange is bounded by the user's roles and the requester's optional client scopes, "
        "not by the subject token: visitflow can obtain write:data:<visit> from a grant that only "
        "says read:data:<visit> (the downscope-assertion-grant-enforcer that would prevent it also "
        "refuses every audience change); the Block asks only for what the grant covers",
        "a data token has a refresh token only if the grant was itself obtained with "
        "requested_token_type=refresh_token (blueapi then holds a client session in the user's "
        "session); otherwise visitflow re-exchanges the grant when the data token expires",
    ]
    base = idp.lifetimes
    kc = {c["clientId"]: c for c in realm.get("clients") or []}
    for cid, c in idp.clients.items():
        if not c.exchange_audiences or cid not in kc:
            continue
        own = idp.lifetimes_for(list(c.audiences)).access
        lifespan = _expected_lifespan(idp, c)
        if "client_credentials" in c.grants and own != lifespan:
            notes.append(f"client {cid}: its own client_credentials tokens also live {lifespan} s "
                         f"(dev IdP: {own} s); Keycloak has one access lifespan per client")
        if lifespan > base.session_max:
            notes.append(f"client {cid}: exchanged tokens are capped at the user's session end "
                         f"(login + ssoSessionMaxLifespan = {base.session_max} s), not {lifespan} s after "
                         "the exchange; and exchanging them again needs the user session still alive")
    return notes
