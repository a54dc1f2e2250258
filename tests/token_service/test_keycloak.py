"""Keycloak for real: our realm in a running Keycloak 26, every token path, the bad-token matrix.

What Keycloak does is *asserted* here, so these tests are also the record of what it does
(docs/production.md §3 is written from them):

* scopes at a token exchange: kept if the user holds the client scope's role; dropped if
  not; the whole request refused (``invalid_scope``) if the scope is not one of the
  requester's client scopes (every run-specific scope); not bounded by the subject token;
* no ``act``; ``aud`` is exactly the requested audience; T_grant lives until the user
  session's end (login + ``ssoSessionMaxLifespan``), not ``access.token.lifespan``;
* a data token carries a refresh token only when asked for (``requested_token_type``) and
  only if the grant was itself obtained with one (blueapi then has a client session).
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import jwt
import pytest

from tests.fixtures.scans import run_scan, user_root
from tests.fixtures.tiled_fixtures import running_tiled
from visitflow.core import oauth
from visitflow.flow.delegation import DataTokenSource
from visitflow.core.scopes import ScopeSet, grant_scopes
from visitflow.core.tokens import TokenValidator, discover, unverified_claims

pytestmark = pytest.mark.keycloak

ALICE_SCOPES = {"read:data:a1", "write:data:a1", "run:saxs_average:a1", "run:peak_stats:a1"}
VISIT_GRANT = "run:saxs_average:a1 read:data:a1 write:data:a1"
VISIT_DATA = "read:data:a1 write:data:a1"


def claims(token: str) -> dict:
    return unverified_claims(token)


def scopes(token: str) -> set[str]:
    return set(claims(token).get("scope", "").split())


@pytest.fixture(scope="module")
def kc_tiled(keycloak, tmp_path_factory):
    """Our Tiled against Keycloak, with revocation checks (introspection by client ``tiled``)."""
    with running_tiled(keycloak, tmp_path_factory.mktemp("kc-tiled"),
                       extra_args=("--introspect-client", "tiled", "--token-cache", "1"),
                       env={"VISITFLOW_TILED_CLIENT_SECRET": "tiled-dev-secret"}) as handle:
        yield handle


@pytest.fixture(scope="module")
def uid(kc_tiled, keycloak):
    return run_scan(kc_tiled.uri, keycloak.token("alice"), num=4)


def grant_and_data(keycloak, grant_scope: str = VISIT_GRANT, data_scope: str = VISIT_DATA):
    user = keycloak.token("alice")
    grant = keycloak.exchange(user, "blueapi", audience="visitflow", scope=grant_scope, refresh=True)
    data = keycloak.exchange(grant["access_token"], "visitflow", audience="tiled", scope=data_scope, refresh=True)
    return grant, data


# ------------------------------------------------------------------ the realm and a login
def test_realm_is_served_with_discovery_and_jwks(keycloak):
    doc = discover(keycloak.issuer)
    assert doc["issuer"] == keycloak.issuer
    assert doc["introspection_endpoint"].startswith(keycloak.issuer)
    keys = httpx.get(doc["jwks_uri"], timeout=10).json()["keys"]
    assert any(k["kty"] == "RSA" and k.get("alg") == "RS256" and k.get("use") == "sig" for k in keys)


def test_alice_login_token_as_keycloak_issues_it(keycloak):
    body = keycloak.login("alice", scope="openid")
    header = jwt.get_unverified_header(body["access_token"])
    c = claims(body["access_token"])
    assert header["alg"] == "RS256" and header["typ"] == "at+jwt"
    assert c["typ"] == "Bearer" and c["azp"] == "visitflow-cli" and c["preferred_username"] == "alice"
    assert uuid.UUID(c["sub"]) and c["sub"] == keycloak.user_id("alice"), "Keycloak's sub is the user id"
    assert set(c["aud"]) == {"blueapi", "tiled"}
    assert set(c["scope"].split()) == ALICE_SCOPES | {"openid"}
    assert 295 <= body["expires_in"] <= 300 and 1790 <= body["refresh_expires_in"] <= 1800
    # the other two token kinds Keycloak hands out, as the bad-token matrix meets them
    assert claims(body["id_token"])["typ"] == "ID" and jwt.get_unverified_header(body["id_token"])["typ"] == "JWT"
    assert jwt.get_unverified_header(body["refresh_token"])["alg"].startswith("HS")
    assert claims(body["refresh_token"])["typ"] == "Refresh"


def test_our_validator_and_tiled_accept_alice(keycloak, kc_tiled, uid):
    token = keycloak.token("alice")
    got = TokenValidator(keycloak.issuer, "tiled").validate(token)
    assert got.scopes.uncovered(ScopeSet.parse("read:data:a1 write:data:a1")) == []
    assert kc_tiled.get(f"metadata/raw/a1/{uid}", token).status_code == 200
    assert kc_tiled.get("metadata/raw/a2", token).status_code in (403, 404)
    assert uid in user_root(kc_tiled.uri, token)["raw"]["a1"]


def test_admin_service_account_token(keycloak):
    token = keycloak.client_token("visitflow-admin")
    c = claims(token)
    assert c["aud"] == "tiled" and c["azp"] == "visitflow-admin" and "visitflow:admin" in c["scope"].split()
    assert uuid.UUID(c["sub"]), "the service account's user id (no profile scope: no preferred_username)"
    r = keycloak.post({"grant_type": "client_credentials"}, auth=("visitflow-admin", "admin-dev-secret")).json()
    assert 295 <= r["expires_in"] <= 300
    # one access lifespan per client: blueapi's own tokens get T_grant's, capped at the SSO maximum
    r = keycloak.post({"grant_type": "client_credentials"}, auth=("blueapi", "blueapi-dev-secret")).json()
    assert 35900 <= r["expires_in"] <= 36000 and claims(r["access_token"])["aud"] == "blueapi"


# ------------------------------------------------------------------ the delegation chain
def test_two_hop_chain_with_refresh(keycloak, kc_tiled, uid):
    grant, data = grant_and_data(keycloak)
    g, d = claims(grant["access_token"]), claims(data["access_token"])
    assert g["aud"] == "visitflow" and g["azp"] == "blueapi" and "act" not in g
    assert scopes(grant["access_token"]) == set(VISIT_GRANT.split())
    assert d["aud"] == "tiled" and d["azp"] == "visitflow" and "act" not in d and d["sub"] == g["sub"]
    assert scopes(data["access_token"]) == set(VISIT_DATA.split())
    # lifetimes: T_grant is capped by the user's SSO session (36000 s), not blueapi's 86400 s
    assert 35000 < grant["expires_in"] <= 36000 and 35000 < g["exp"] - g["iat"] <= 36000
    assert 295 <= data["expires_in"] <= 300 and 1790 <= data["refresh_expires_in"] <= 1800
    assert kc_tiled.get(f"metadata/raw/a1/{uid}", data["access_token"]).status_code == 200

    refreshed = oauth.refresh(keycloak.token_url, data["refresh_token"], client_id="visitflow",
                              client_secret="visitflow-dev-secret")
    r = claims(refreshed.access_token)
    assert r["aud"] == "tiled", "no self-audience on the visitflow client, so a refresh stays aud=tiled"
    assert set(r["scope"].split()) == set(VISIT_DATA.split()) and r["jti"] != d["jti"]
    assert kc_tiled.get(f"metadata/raw/a1/{uid}", refreshed.access_token).status_code == 200


# What Keycloak did with each scope asked for at blueapi's exchange of alice's token.
SCOPE_CASES = {
    "held visit scopes: kept": (VISIT_GRANT, 200, set(VISIT_GRANT.split())),
    "no scope parameter: default client scopes only, none of ours": (None, 200, set()),
    "openid: kept": ("openid read:data:a1", 200, {"openid", "read:data:a1"}),
    "a scope alice lacks (bob's visit): dropped": ("read:data:a1 read:data:a2", 200, {"read:data:a1"}),
    "a wildcard alice lacks: dropped": ("run:*:a2", 200, set()),
    "run-specific scopes: the whole request refused": (
        "run:saxs_average:a1 read:raw:a1/r1 write:processed:a1/r1", "invalid_scope", None),
    "a wildcard that is no client scope: refused": ("run:*:a1", "invalid_scope", None),
}


@pytest.mark.parametrize("case", list(SCOPE_CASES))
def test_what_keycloak_does_with_each_scope(keycloak, case):
    scope, want, kept = SCOPE_CASES[case]
    r = keycloak.exchange_response(keycloak.token("alice"), "blueapi", audience="visitflow", scope=scope)
    if want == 200:
        assert r.status_code == 200, r.text
        assert scopes(r.json()["access_token"]) == kept and set(r.json()["scope"].split()) == kept
    else:
        assert r.status_code == 400 and r.json()["error"] == want, r.text


def test_exchange_is_bounded_by_roles_not_by_the_subject_token(keycloak):
    """The grant says read only; visitflow still gets write: Keycloak checks alice's roles."""
    _, data = grant_and_data(keycloak, grant_scope="run:saxs_average:a1 read:data:a1", data_scope=VISIT_DATA)
    assert scopes(data["access_token"]) == set(VISIT_DATA.split())


def test_refreshable_data_token_needs_a_refreshable_grant(keycloak):
    grant = keycloak.exchange(keycloak.token("alice"), "blueapi", audience="visitflow", scope=VISIT_GRANT)
    assert "refresh_token" not in grant and grant["refresh_expires_in"] == 0
    r = keycloak.exchange_response(grant["access_token"], "visitflow", audience="tiled", scope=VISIT_DATA,
                                   refresh=True)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert "creating a new session is needed" in r.json()["error_description"]
    # the Block's token source falls back to re-exchanging the grant
    source = DataTokenSource(keycloak.token_url, grant["access_token"], "visitflow", "visitflow-dev-secret",
                             "a1", "ignored", per="visit")
    token, _ = source()
    assert scopes(token) == set(VISIT_DATA.split()) and source._current.refresh_token is None
    # ... and with a refreshable grant it gets (and uses) a refresh token
    grant, _ = grant_and_data(keycloak)
    source = DataTokenSource(keycloak.token_url, grant["access_token"], "visitflow", "visitflow-dev-secret",
                             "a1", "ignored", per="visit")
    source()
    assert source._current.refresh_token
    source.force_refresh()
    assert source.refreshes == 1 and source.exchanges == 1


AUDIENCE_CASES = {
    "blueapi may not mint aud=tiled": ("user", "blueapi", "tiled", 400, "invalid_request"),
    "visitflow is not in the user token's aud": ("user", "visitflow", "tiled", 403, "access_denied"),
    "an audience that is no client": ("user", "blueapi", "no-such-client", 400, "invalid_client"),
    "tiled is not enabled for exchange": ("user", "tiled", "tiled", 400, "invalid_request"),
}


@pytest.mark.parametrize("case", list(AUDIENCE_CASES))
def test_audience_refusals(keycloak, case):
    _, client, audience, status, error = AUDIENCE_CASES[case]
    r = keycloak.exchange_response(keycloak.token("alice"), client, audience=audience, scope="read:data:a1")
    assert (r.status_code, r.json()["error"]) == (status, error), r.text


def test_the_downscope_enforcer_would_break_the_chain(keycloak):
    """Why realm.json has no downscope-assertion-grant-enforcer policy: applied to token
    exchange it also refuses every audience the subject token lacks."""
    admin = f"{keycloak.base}/admin/realms/visitflow"
    headers = {"Authorization": f"Bearer {keycloak.admin_token()}"}
    profiles = httpx.get(f"{admin}/client-policies/profiles", headers=headers, timeout=10).json()
    policies = httpx.get(f"{admin}/client-policies/policies", headers=headers, timeout=10).json()
    assert not policies.get("policies"), "the shipped realm has no client policy"
    with_enforcer = {"profiles": [{"name": "downscope", "executors": [
        {"executor": "downscope-assertion-grant-enforcer", "configuration": {}}]}]}
    policy = {"policies": [{"name": "downscope", "enabled": True, "profiles": ["downscope"], "conditions": [
        {"condition": "grant-type",
         "configuration": {"grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"]}}]}]}
    assert httpx.put(f"{admin}/client-policies/profiles", headers=headers, json=with_enforcer).status_code == 204
    try:
        assert httpx.put(f"{admin}/client-policies/policies", headers=headers, json=policy).status_code == 204
        user = keycloak.token("alice")
        r = keycloak.exchange_response(user, "blueapi", audience="visitflow", scope=VISIT_GRANT)
        assert r.status_code == 400 and "Requested audience not available: visitflow" in r.json()["error_description"]
        r = keycloak.exchange_response(user, "blueapi", scope=VISIT_GRANT)
        assert r.status_code == 200 and "aud" not in claims(r.json()["access_token"])
        r = keycloak.exchange_response(user, "blueapi", scope="read:raw:a1/r1")
        assert r.status_code == 400 and "not present in the initial access token" in r.json()["error_description"]
    finally:
        httpx.put(f"{admin}/client-policies/policies", headers=headers, json=policies)
        httpx.put(f"{admin}/client-policies/profiles", headers=headers, json=profiles)
    assert keycloak.exchange(keycloak.token("alice"), "blueapi", audience="visitflow", scope=VISIT_GRANT)


def test_per_run_grant_is_refused_so_visit_mode_is_needed(keycloak):
    uid = "0123abcd-run"
    r = keycloak.exchange_response(keycloak.token("alice"), "blueapi", audience="visitflow",
                                   scope=str(grant_scopes("saxs_average", "a1", uid)))
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    grant = keycloak.exchange(keycloak.token("alice"), "blueapi", audience="visitflow",
                              scope=str(grant_scopes("saxs_average", "a1", uid, "visit")), refresh=True)
    assert scopes(grant["access_token"]) == set(VISIT_GRANT.split())


# ------------------------------------------------------------------ the bad-token matrix at Tiled
def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    c = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    c["scope"] = c["scope"] + " read:data:a2"
    body = base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def _alg_none(token: str) -> str:
    return jwt.encode(claims(token), key=None, algorithm="none", headers={"typ": "at+jwt"})


def _expired(keycloak) -> str:
    from tests.fixtures.keycloak_fixtures import SHORT_CLIENT, SHORT_LIFESPAN

    token = keycloak.token("alice", client_id=SHORT_CLIENT)
    c = claims(token)
    aud = {c["aud"]} if isinstance(c["aud"], str) else set(c["aud"])  # Keycloak's order varies
    assert c["exp"] - c["iat"] == SHORT_LIFESPAN and aud in ({"tiled"}, {"blueapi", "tiled"})
    time.sleep(SHORT_LIFESPAN + 10 + 1)  # past exp plus the authenticator's 10 s leeway
    return token


def _logged_out(keycloak) -> str:
    body = keycloak.login("alice")
    r = keycloak.logout(body["refresh_token"])
    assert r.status_code == 204, r.text
    return body["access_token"]


BAD_TOKENS = {
    "expired": (_expired, "expired"),
    "another client's audience (T_grant, aud visitflow)": (
        lambda kc: grant_and_data(kc)[0]["access_token"], "audience"),
    "another client's audience (blueapi service account)": (lambda kc: kc.client_token("blueapi"), "audience"),
    "another realm's token": (lambda kc: kc.other_realm_token(), "signing key"),
    "ID token as access token": (lambda kc: kc.login("alice", scope="openid")["id_token"], "audience"),
    "refresh token as access token": (lambda kc: kc.login("alice")["refresh_token"], "HS512"),
    "tampered signature": (lambda kc: _tamper(kc.token("alice")), "signature"),
    "alg none": (lambda kc: _alg_none(kc.token("alice")), "'none'"),
    "logged-out session (introspection on)": (_logged_out, "no longer active"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_keycloak_tokens_are_refused_with_a_reason(keycloak, kc_tiled, uid, case):
    make, reason = BAD_TOKENS[case]
    token = make(keycloak)
    r = kc_tiled.get(f"metadata/raw/a1/{uid}", token)
    assert r.status_code in (401, 403), (case, r.status_code, r.text)
    assert reason in r.json()["detail"], (case, r.text)


def test_id_token_with_tiled_audience_is_still_no_access_token(keycloak):
    """Refused for its kind, not only for its audience: the ``typ: ID`` claim is checked."""
    id_token = keycloak.login("alice", scope="openid")["id_token"]
    validator = TokenValidator(keycloak.issuer, "visitflow-cli")
    with pytest.raises(Exception, match="ID token, not an access token"):
        validator.validate(id_token)
