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
    'LOGIN_CLIENT', 'LOGIN_AUDIENCES', 'per_visit_parts', 'identity_realm', 'identity_problems', 'render',
    'main',
]

LOGIN_CLIENT = "visitflow-cli"
LOGIN_AUDIENCES = ("blueapi", "tiled")


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


def identity_realm(realm: dict) -> dict:
    """``realm`` without per-visit roles and client scopes (and every reference to them)."""
    out = copy.deepcopy(realm)
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
    out["displayName"] = "visitflow facility realm: identity and audiences only (authority: OPA)"
    return out


def identity_problems(realm: dict) -> list[str]:
    """Why ``realm`` is not an identity-only realm for the token-service topology ([] = fine)."""
    problems = [f"{part} is per visit: authority belongs to OPA" for part in per_visit_parts(realm)]
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
