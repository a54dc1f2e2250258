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
    assert {u["username"] for u in realm["users"]} == {"service-account-visitflow-admin",
                                                       "service-account-i22-blueapi-tiled"}, "no dev users"
    assert realm["realm"] == "facility"
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


def test_dev_users_dev_secrets_the_password_grant_and_long_tokens_are_refused():
    """Each dev part, added alone to the shipped facility realm, is named (and the realm is
    fine without it): the checks that let the old realm-facility.json pass now refuse it."""
    facility = json.loads(FACILITY.read_text())
    assert identity_problems(facility) == []
    cases = {
        "user mallory is a dev user (password = username)": lambda r: r["users"].append(
            {"username": "mallory", "enabled": True,
             "credentials": [{"type": "password", "value": "mallory", "temporary": False}]}),
        "user eve is a dev user (credentials in the realm file)": lambda r: r["users"].append(
            {"username": "eve", "credentials": [{"type": "password", "value": "s3cret-Pw"}]}),
        "client blueapi ships a dev secret in the realm file": lambda r: _client(r, "blueapi").update(
            secret="blueapi-dev-secret"),
        "client tiled ships a secret in the realm file": lambda r: _client(r, "tiled").update(secret="x" * 32),
        "client visitflow-cli allows the password grant (directAccessGrantsEnabled)": lambda r: _client(
            r, "visitflow-cli").update(directAccessGrantsEnabled=True),
        "client blueapi access tokens live 86400 s (> 3600)": lambda r: _client(r, "blueapi")["attributes"].update(
            {"access.token.lifespan": "86400"}),
        "realm access tokens live 86400 s (> 3600)": lambda r: r.update(accessTokenLifespan=86400),
    }
    for expected, mutate in cases.items():
        broken = copy.deepcopy(facility)
        mutate(broken)
        assert identity_problems(broken) == [expected], expected


def test_the_tests_dev_overlay_is_refused_as_a_facility_realm():
    """What the keycloak/opa suites import on top of the shipped realm is test-only."""
    from tests.fixtures.keycloak_fixtures import facility_realm

    problems = identity_problems(facility_realm())
    for part in ("user alice is a dev user", "client visitflow ships a dev secret",
                 "client visitflow-cli allows the password grant"):
        assert any(p.startswith(part) for p in problems), part


def _client(realm: dict, client_id: str) -> dict:
    return next(c for c in realm["clients"] if c["clientId"] == client_id)


def test_the_shipped_facility_realm_is_the_identity_realm_of_the_shipped_one():
    """What a facility imports (and the opa suite runs on Keycloak) is not hand-edited: it is
    ``identity_realm(realm.json)``; regenerate with ``python -m visitflow.production.keycloak_identity``."""
    assert FACILITY.read_text() == render(shipped()), "realm-facility.json is stale: regenerate it"
    facility = json.loads(FACILITY.read_text())
    assert identity_problems(facility) == [] and per_visit_parts(facility) == []
    assert per_visit_parts(shipped()), "the control: the embedded realm does carry per-visit parts"


def test_the_beamline_service_account_writes_for_tiled_and_names_its_beamline():
    """blueapi's Tiled writer (``tiled.authentication: ServiceAccount``): client credentials only,
    ``aud: tiled``, a hard-coded ``beamline`` claim, no secret in the shipped file."""
    realm = json.loads(FACILITY.read_text())
    sa = next(c for c in realm["clients"] if c["clientId"] == "i22-blueapi-tiled")
    assert sa["serviceAccountsEnabled"] and not sa["publicClient"] and "secret" not in sa
    assert not (sa["standardFlowEnabled"] or sa["directAccessGrantsEnabled"] or sa["implicitFlowEnabled"])
    assert client_audiences(realm, sa) == {"tiled"}
    (claim,) = [m["config"] for m in sa["protocolMappers"] if m["protocolMapper"] == "oidc-hardcoded-claim-mapper"]
    assert (claim["claim.name"], claim["claim.value"], claim["access.token.claim"]) == ("beamline", "i22", "true")
