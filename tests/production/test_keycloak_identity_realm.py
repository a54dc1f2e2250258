"""The identity-only Keycloak realm of the token-service topology (pure, over realm.json)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from visitflow.production.keycloak import client_audiences
from visitflow.production.keycloak_identity import identity_problems, identity_realm, per_visit_parts, render

REALM = Path(__file__).resolve().parents[2] / "deployments" / "keycloak" / "realm.json"
FACILITY = REALM.with_name("realm-facility.json")


def shipped() -> dict:
    return json.loads(REALM.read_text())


def test_the_embedded_realm_is_per_visit_and_says_so():
    problems = identity_problems(shipped())
    assert "client scope read:data:a1 is per visit: authority belongs to OPA" in problems
    assert any(p.startswith("user alice holds per-visit roles") for p in problems)


def test_the_identity_realm_has_no_per_visit_parts_and_keeps_audiences():
    realm = identity_realm(shipped())
    assert identity_problems(realm) == [] and per_visit_parts(realm) == []
    clients = {c["clientId"]: c for c in realm["clients"]}
    assert client_audiences(realm, clients["visitflow-cli"]) >= {"blueapi", "tiled"}
    assert {u["username"] for u in realm["users"]} >= {"alice", "bob", "carol"}
    roles = {r["name"] for r in realm["roles"]["realm"]}
    assert "visitflow:admin" in roles, "opaque scopes (the admin's) are not per visit"
    text = json.dumps(realm)
    for scope in ("read:data:a1", "run:saxs_average:a1", "run:*:a2"):
        assert f'"{scope}"' not in text, scope


def test_a_login_client_without_the_blueapi_audience_is_a_problem():
    realm = identity_realm(shipped())
    broken = copy.deepcopy(realm)
    for c in broken["clients"]:
        if c["clientId"] == "visitflow-cli":
            c["protocolMappers"] = [m for m in c.get("protocolMappers") or []
                                    if (m.get("config") or {}).get("included.client.audience") != "blueapi"]
    assert identity_problems(broken) == ["login tokens lack aud ['blueapi']"]


def test_the_shipped_facility_realm_is_the_identity_realm_of_the_shipped_one():
    """What a facility imports (and the opa suite runs on Keycloak) is not hand-edited: it is
    ``identity_realm(realm.json)``; regenerate with ``python -m visitflow.production.keycloak_identity``."""
    assert FACILITY.read_text() == render(shipped()), "realm-facility.json is stale: regenerate it"
    facility = json.loads(FACILITY.read_text())
    assert identity_problems(facility) == [] and per_visit_parts(facility) == []
    assert per_visit_parts(shipped()), "the control: the embedded realm does carry per-visit parts"
