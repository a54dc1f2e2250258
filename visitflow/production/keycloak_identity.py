"""The Keycloak realm for the token-service topology (docs/production.md §9): identity only.

With the token service and OPA deciding authority, Keycloak needs no realm role or client
scope *per visit* (a facility has tens of thousands of sessions, and membership changes
daily).  What it must still do: authenticate users and put ``blueapi`` and ``tiled`` into
the login tokens' ``aud`` (blueapi validates them; the token service requires the requesting
client in ``aud``; Tiled accepts users' own tokens for audience ``tiled``).

:func:`identity_realm` derives that realm from ``deployments/keycloak/realm.json`` (the
embedded stack's mirror of the dev IdP, which does carry per-visit scopes), and
:func:`identity_problems` checks a realm against these rules — so the shipped realm and the
facility one cannot drift apart silently.  The result is shipped as
``deployments/keycloak/realm-facility.json`` (what a facility imports, and what the ``opa``
suite runs on real Keycloak); ``tests/production/test_keycloak_identity_realm.py`` fails when it is stale.
Regenerate it with ``python -m visitflow.production.keycloak_identity``.

One part is the facility realm's own (realm.json, the dev IdP's mirror, has none): a
confidential client per beamline whose service account blueapi writes raw data to Tiled with
(``tiled.authentication: ServiceAccount``, the mode Diamond runs): :func:`beamline_service_account`,
``i22-blueapi-tiled`` for the example beamline.  Its tokens carry ``aud: tiled`` and a
``beamline`` claim (a hard-coded claim of that client, so no user token can carry it); OPA
matches the claim against ``facility.beamlines[bl].service_accounts`` (deployments/opa/authz.rego).

The facility realm is what a facility imports, so it is also *not* the dev realm: realm.json's
demo users (password = username), its ``*-dev-secret`` client secrets, the password grant and
its long (86400 s) token lifespans stay behind (docs/production.md §9, "the facility realm").
Keycloak generates a secret for each confidential client on import; the operator reads it
from the admin console into the services' Secrets.  Tests that need users add them in an
overlay of their own (tests/fixtures/keycloak_fixtures.py), never by editing the shipped file.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from ..core.scopes import OpaqueScope, parse_scope
from ..errors import ScopeError
from .keycloak import client_audiences

__all__ = [
    'LOGIN_CLIENT', 'LOGIN_AUDIENCES', 'FACILITY_REALM', 'MAX_ACCESS_LIFESPAN', 'BEAMLINES',
    'beamline_client_id', 'beamline_service_account', 'beamline_service_account_user', 'per_visit_parts',
    'dev_parts', 'identity_realm', 'identity_problems', 'render',
    'main',
]

LOGIN_CLIENT = "visitflow-cli"
LOGIN_AUDIENCES = ("blueapi", "tiled")
#: The facility realm's name: its issuer is ``https://KEYCLOAK/realms/facility`` (the embedded
#: dev realm, realm.json, is ``visitflow``).
FACILITY_REALM = "facility"
#: Longest access-token lifespan a facility realm may set (a login token is refreshed, not long-lived).
MAX_ACCESS_LIFESPAN = 3600
#: Beamlines whose blueapi writes to Tiled as a service account, in the shipped facility realm
#: (the example beamline of deployments/opa/data.json; a facility lists its own).
BEAMLINES = ("i22",)


def beamline_client_id(beamline: str) -> str:
    return f"{beamline}-blueapi-tiled"


def beamline_service_account_user(beamline: str) -> dict:
    """The service-account user of :func:`beamline_service_account` (no roles: OPA decides)."""
    cid = beamline_client_id(beamline)
    return {"username": f"service-account-{cid}", "enabled": True, "serviceAccountClientId": cid,
            "realmRoles": []}


def beamline_service_account(beamline: str) -> dict:
    """The Keycloak client of ``beamline``'s blueapi Tiled writer: client credentials only,
    tokens for Tiled (``aud: tiled``, ``beamline: <bl>``), no secret in the file (Keycloak makes
    one on import; the operator puts it in blueapi's ``tiled.authentication.client_secret``)."""
    cid = beamline_client_id(beamline)
    return {
        "clientId": cid, "name": cid, "enabled": True, "protocol": "openid-connect",
        "description": (f"blueapi of beamline {beamline} writes raw data to Tiled as this service account "
                        "(tiled.authentication: ServiceAccount); OPA lets it write its beamline's raw runs only."),
        "publicClient": False, "clientAuthenticatorType": "client-secret", "serviceAccountsEnabled": True,
        "standardFlowEnabled": False, "implicitFlowEnabled": False, "directAccessGrantsEnabled": False,
        "fullScopeAllowed": False, "frontchannelLogout": False, "consentRequired": False,
        "attributes": {"access.token.header.type.rfc9068": "true", "use.refresh.tokens": "false"},
        "defaultClientScopes": ["basic", "profile"], "optionalClientScopes": [],
        "protocolMappers": [
            {"name": "audience tiled", "protocol": "openid-connect", "protocolMapper": "oidc-audience-mapper",
             "consentRequired": False,
             "config": {"included.client.audience": "tiled", "access.token.claim": "true",
                        "introspection.token.claim": "true", "id.token.claim": "false"}},
            {"name": "beamline", "protocol": "openid-connect", "protocolMapper": "oidc-hardcoded-claim-mapper",
             "consentRequired": False,
             "config": {"claim.name": "beamline", "claim.value": beamline, "jsonType.label": "String",
                        "access.token.claim": "true", "introspection.token.claim": "true",
                        "id.token.claim": "false", "userinfo.token.claim": "false"}},
        ],
    }


def _per_visit(name: str) -> bool:
    try:
        return not isinstance(parse_scope(name), OpaqueScope)
    except ScopeError:
        return True  # malformed visitflow-looking names are per-visit too


def per_visit_parts(realm: dict) -> list[str]:
    """Realm roles and client scopes that grant a visitflow scope (``read:data:a1``...)."""
    roles = [f"realm role {r['name']}" for r in (realm.get("roles") or {}).get("realm") or [] if _per_visit(r["name"])]
    scopes = [f"client scope {s['name']}" for s in realm.get("clientScopes") or [] if _per_visit(s["name"])]
    return roles + scopes


def _dev_user(user: dict) -> bool:
    return bool(user.get("credentials")) or "visitflow.dev-only" in (user.get("attributes") or {})


def dev_parts(realm: dict) -> list[str]:
    """What only a dev realm may carry: users with passwords in the file (demo users),
    client secrets in the file (``*-dev-secret``), the password grant, long access tokens."""
    out = []
    for user in realm.get("users") or []:
        creds = [c for c in user.get("credentials") or [] if c.get("type") == "password"]
        if any(c.get("value") == user.get("username") for c in creds):
            out.append(f"user {user.get('username')} is a dev user (password = username)")
        elif _dev_user(user):
            out.append(f"user {user.get('username')} is a dev user (credentials in the realm file)")
    for client in realm.get("clients") or []:
        cid = client.get("clientId")
        secret = client.get("secret")
        if secret and not client.get("publicClient"):
            kind = "a dev secret" if str(secret).endswith("-dev-secret") else "a secret"
            out.append(f"client {cid} ships {kind} in the realm file")
        if client.get("directAccessGrantsEnabled"):
            out.append(f"client {cid} allows the password grant (directAccessGrantsEnabled)")
        life = (client.get("attributes") or {}).get("access.token.lifespan")
        if life and int(life) > MAX_ACCESS_LIFESPAN:
            out.append(f"client {cid} access tokens live {life} s (> {MAX_ACCESS_LIFESPAN})")
    if int(realm.get("accessTokenLifespan") or 0) > MAX_ACCESS_LIFESPAN:
        out.append(f"realm access tokens live {realm['accessTokenLifespan']} s (> {MAX_ACCESS_LIFESPAN})")
    return out


def identity_realm(realm: dict) -> dict:
    """``realm`` without per-visit roles and client scopes (and every reference to them), and
    without its dev parts (:func:`dev_parts`), named :data:`FACILITY_REALM`."""
    out = copy.deepcopy(realm)
    out["realm"] = FACILITY_REALM
    out["users"] = [u for u in out.get("users") or [] if not _dev_user(u)]
    for client in out.get("clients") or []:
        client.pop("secret", None)
        client["directAccessGrantsEnabled"] = False
        attrs = client.get("attributes") or {}
        if int(attrs.get("access.token.lifespan") or 0) > MAX_ACCESS_LIFESPAN:
            del attrs["access.token.lifespan"]
        if client.get("clientId") == LOGIN_CLIENT:
            client["description"] = ("Public login client (users): the browser (PKCE) or the device flow; "
                                     "no password grant in the facility realm.")
    roles = out.get("roles") or {}
    roles["realm"] = [r for r in roles.get("realm") or [] if not _per_visit(r["name"])]
    out["clientScopes"] = [s for s in out.get("clientScopes") or [] if not _per_visit(s["name"])]
    out["scopeMappings"] = [m for m in out.get("scopeMappings") or [] if not _per_visit(m.get("clientScope", ""))]
    for key in ("defaultDefaultClientScopes", "defaultOptionalClientScopes"):
        if key in out:
            out[key] = [s for s in out[key] if not _per_visit(s)]
    for client in out.get("clients") or []:
        for key in ("defaultClientScopes", "optionalClientScopes"):
            if key in client:
                client[key] = [s for s in client[key] if not _per_visit(s)]
    for user in out.get("users") or []:
        if "realmRoles" in user:
            user["realmRoles"] = [r for r in user["realmRoles"] if not _per_visit(r)]
    known = {c.get("clientId") for c in out.get("clients") or []}
    for bl in BEAMLINES:
        if beamline_client_id(bl) not in known:
            out.setdefault("clients", []).append(beamline_service_account(bl))
            out.setdefault("users", []).append(beamline_service_account_user(bl))
    out["displayName"] = "visitflow facility realm: identity and audiences only (authority: OPA)"
    return out


def identity_problems(realm: dict) -> list[str]:
    """Why ``realm`` is not an identity-only facility realm for the token-service topology
    ([] = fine): per-visit parts, and the dev parts of :func:`dev_parts`."""
    problems = [f"{part} is per visit: authority belongs to OPA" for part in per_visit_parts(realm)]
    problems += dev_parts(realm)
    login = [c for c in realm.get("clients") or [] if c.get("clientId") == LOGIN_CLIENT]
    if not login:
        problems.append(f"no login client {LOGIN_CLIENT}")
    else:
        missing = set(LOGIN_AUDIENCES) - client_audiences(realm, login[0])
        if missing:
            problems.append(f"login tokens lack aud {sorted(missing)}")
    for user in realm.get("users") or []:
        bad = [r for r in user.get("realmRoles") or [] if _per_visit(r)]
        if bad:
            problems.append(f"user {user.get('username')} holds per-visit roles {bad}")
    return problems


def render(realm: dict) -> str:
    """The identity realm of ``realm`` as the shipped file's text (stable key order)."""
    return json.dumps(identity_realm(realm), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``deployments/keycloak/realm-facility.json`` from ``realm.json`` (or print it: ``-``)."""
    root = Path(__file__).resolve().parents[2] / "deployments" / "keycloak"
    args = sys.argv[1:] if argv is None else argv
    text = render(json.loads((root / "realm.json").read_text()))
    if args == ["-"]:
        sys.stdout.write(text)
    else:
        (root / "realm-facility.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
