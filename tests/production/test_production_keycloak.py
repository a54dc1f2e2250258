"""deployments/keycloak/realm.json and deployments/idp.yaml describe the same IdP.

``compare`` must find nothing for the shipped files, and must name the difference when either
side is changed: a client removed, a lifetime changed, a user scope dropped, an exchange
audience changed.  No Keycloak runs here (see docs/production.md for what that leaves open).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from visitflow.token_service.config import IdPConfig
from visitflow.production.keycloak import compare, exchange_audiences, limitations

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped():
    realm = json.loads((ROOT / "deployments" / "keycloak" / "realm.json").read_text())
    idp = yaml.safe_load((ROOT / "deployments" / "idp.yaml").read_text())
    return realm, idp


@pytest.fixture
def realm(shipped):
    return copy.deepcopy(shipped[0])


@pytest.fixture
def idp(shipped):
    return copy.deepcopy(shipped[1])


def client(realm: dict, cid: str) -> dict:
    (c,) = [c for c in realm["clients"] if c["clientId"] == cid]
    return c


def user(realm: dict, name: str) -> dict:
    (u,) = [u for u in realm["users"] if u["username"] == name]
    return u


def test_shipped_files_agree(shipped):
    realm, idp = shipped
    IdPConfig.from_dict(idp)  # the YAML itself is valid
    assert compare(realm, idp) == []


def test_realm_basics(shipped):
    realm, _ = shipped
    assert realm["realm"] == "visitflow"
    for cid in ("blueapi", "visitflow"):
        assert client(realm, cid)["attributes"]["standard.token.exchange.enabled"] == "true"
    assert client(realm, "visitflow-cli")["publicClient"] is True
    assert client(realm, "visitflow-admin")["serviceAccountsEnabled"] is True
    for name in ("alice", "bob", "carol"):
        assert "dev-only" in json.dumps(user(realm, name)["attributes"])


# ----------------------------------------------------------- one side changed: a client


def test_client_removed_from_realm(realm, idp):
    realm["clients"] = [c for c in realm["clients"] if c["clientId"] != "visitflow-admin"]
    assert "client visitflow-admin: in the dev IdP, missing from the realm" in compare(realm, idp)


def test_client_removed_from_idp(realm, idp):
    del idp["clients"]["tiled"]
    idp["clients"]["visitflow"]["exchange_audiences"] = ["tiled"]  # still declared as an audience
    assert "client tiled: in the realm, not in the dev IdP" in compare(realm, idp)


def test_client_turned_public(realm, idp):
    client(realm, "blueapi")["publicClient"] = True
    diffs = compare(realm, idp)
    assert "client blueapi: publicClient=True but dev IdP public=False" in diffs
    assert "client blueapi: public clients cannot use standard token exchange" in diffs


def test_grant_switched_off(realm, idp):
    client(realm, "visitflow")["attributes"]["standard.token.exchange.enabled"] = "false"
    diffs = compare(realm, idp)
    assert ("client visitflow: grant urn:ietf:params:oauth:grant-type:token-exchange is off in the realm, "
            "on in the dev IdP") in diffs
    assert "client visitflow: may exchange for audiences [] in the realm, ['tiled'] in the dev IdP" in diffs


# --------------------------------------------------------------- lifetimes


def test_realm_lifetime_changed(realm, idp):
    realm["accessTokenLifespan"] = 600
    diffs = compare(realm, idp)
    assert "realm accessTokenLifespan is 600, dev IdP lifetimes.access is 300" in diffs


def test_idp_session_max_changed(realm, idp):
    idp["lifetimes"]["session_max"] = 7200
    diffs = compare(realm, idp)
    assert "realm ssoSessionMaxLifespan is 36000, dev IdP lifetimes.session_max is 7200" in diffs


def test_grant_lifetime_changed(realm, idp):
    idp["audiences"]["visitflow"]["access"] = 43200
    assert "client blueapi: access tokens live 86400 s in the realm, 43200 s in the dev IdP" in compare(realm, idp)


def test_refresh_lifetime_changed(realm, idp):
    client(realm, "visitflow-cli")["attributes"]["client.session.idle.timeout"] = "3600"
    assert "client visitflow-cli: refresh tokens live 3600 s in the realm, 1800 s in the dev IdP" in compare(realm, idp)


def test_id_token_lifetime_keycloak_cannot_express(realm, idp):
    idp["lifetimes"]["id_token"] = 600
    assert any("Keycloak gives ID tokens the access token's expiry" in d for d in compare(realm, idp))


# --------------------------------------------------------------- scopes


def test_user_scope_dropped_in_idp(realm, idp):
    idp["users"]["alice"]["scopes"].remove("run:peak_stats:a1")
    diffs = compare(realm, idp)
    assert ("user alice: scopes ['read:data:a1', 'run:peak_stats:a1', 'run:saxs_average:a1', 'write:data:a1'] "
            "in the realm, ['read:data:a1', 'run:saxs_average:a1', 'write:data:a1'] in the dev IdP") in diffs


def test_user_scope_dropped_in_realm(realm, idp):
    user(realm, "carol")["realmRoles"].remove("write:data:a1")
    diffs = compare(realm, idp)
    assert "user carol: scopes ['read:data:a1'] in the realm, ['read:data:a1', 'write:data:a1'] in the dev IdP" in diffs


def test_scope_not_offered_at_login(realm, idp):
    client(realm, "visitflow-cli")["defaultClientScopes"].remove("run:*:a2")
    diffs = compare(realm, idp)
    assert "client visitflow-cli: user scopes not default at login: ['run:*:a2']" in diffs
    assert any(d.startswith("user bob: a login at visitflow-cli would carry") for d in diffs)


def test_scope_gate_removed(realm, idp):
    realm["scopeMappings"] = [m for m in realm["scopeMappings"] if m["clientScope"] != "write:data:a2"]
    diffs = compare(realm, idp)
    assert "scope write:data:a2: client scope must be gated by exactly the realm role write:data:a2, is []" in diffs


def test_malformed_scope_role(realm, idp):
    realm["roles"]["realm"].append({"name": "read:data:"})
    assert any("malformed visitflow scope 'read:data:'" in d for d in compare(realm, idp))


def test_service_account_scope_changed(realm, idp):
    idp["clients"]["visitflow-admin"]["scopes"] = []
    assert ("client visitflow-admin: client_credentials scopes ['visitflow:admin'] in the realm, [] in the dev IdP"
            in compare(realm, idp))


# --------------------------------------------------------------- audiences and exchange


def test_exchange_audience_changed_in_idp(realm, idp):
    idp["clients"]["blueapi"]["exchange_audiences"] = ["visitflow", "tiled"]
    assert ("client blueapi: may exchange for audiences ['visitflow'] in the realm, ['tiled', 'visitflow'] "
            "in the dev IdP") in compare(realm, idp)


def test_exchange_audience_changed_in_realm(realm, idp):
    realm["clientScopeMappings"]["tiled"].append({"client": "blueapi", "roles": ["data-access"]})
    assert exchange_audiences(realm, client(realm, "blueapi")) == {"visitflow", "tiled"}
    assert ("client blueapi: may exchange for audiences ['tiled', 'visitflow'] in the realm, ['visitflow'] "
            "in the dev IdP") in compare(realm, idp)


def test_login_audience_changed(realm, idp):
    client(realm, "visitflow-cli")["protocolMappers"].pop()  # the tiled audience mapper
    assert ("client visitflow-cli: token audiences ['blueapi'] in the realm, ['blueapi', 'tiled'] in the dev IdP"
            in compare(realm, idp))


def test_exchange_refresh_changed(realm, idp):
    idp["clients"]["visitflow"]["exchange_refresh"] = False
    assert any(d.startswith("client visitflow: standard.token.exchange.enableRefreshRequestedTokenType=SAME_SESSION")
               for d in compare(realm, idp))


def test_downscope_policy_refused(realm, idp):
    """The enforcer refuses every audience change (observed: tests/token_service/test_keycloak.py)."""
    realm["clientProfiles"] = {"profiles": [{"name": "p", "executors": [
        {"executor": "downscope-assertion-grant-enforcer", "configuration": {}}]}]}
    realm["clientPolicies"] = {"policies": [{"name": "downscope", "enabled": True, "profiles": ["p"],
                                             "conditions": [{"condition": "any-client", "configuration": {}}]}]}
    assert any("downscope-assertion-grant-enforcer refuses every audience change" in d for d in compare(realm, idp))


def test_full_scope_allowed(realm, idp):
    client(realm, "tiled")["fullScopeAllowed"] = True
    assert any(d.startswith("client tiled: fullScopeAllowed is on") for d in compare(realm, idp))


# --------------------------------------------------------------- honest limits


def test_limitations_are_stated(shipped):
    realm, idp = shipped
    notes = "\n".join(limitations(realm, idp))
    assert "no `act` claim" in notes
    assert "run-specific scopes" in notes
    assert "client blueapi: its own client_credentials tokens also live 86400 s" in notes
    assert "capped at the user's session end" in notes
