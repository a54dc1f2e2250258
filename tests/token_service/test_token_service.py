"""The token service in production mode (deployments/token-service.yaml): it federates the
facility IdP (real Keycloak, realm ``facility``: tests/fixtures/federation_fixtures.py), asks a real OPA, mints run-bound
grants and data tokens, persists keys and revocations — and refuses everything else with a
reason, never a 500."""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest

from tests.tiled.test_tiled_access import _hs256_with_public_key
from visitflow.core.scopes import ScopeSet, data_token_scopes, grant_scopes
from visitflow.core.tokens import unverified_claims

pytestmark = pytest.mark.opa


def claims_of(token: str) -> dict:
    return unverified_claims(token)


def grant_for(ts, user_token: str, visit="a1", run="r1", analysis="saxs_average"):
    return ts.exchange_response(user_token, "blueapi", audience="visitflow",
                                scope=str(grant_scopes(analysis, visit, run)))


def data_for(ts, grant: str, visit="a1", run="r1", analysis="saxs_average"):
    """As the Block asks (RFC 8693 ``requested_token_type``): a data token and its refresh token,
    writing only its own analysis' place (``DataTokenSource(analysis=...)``)."""
    return ts.exchange_response(grant, "visitflow", audience="tiled",
                                scope=str(data_token_scopes(visit, run, analysis=analysis)),
                                refresh=True)


def refusal(r, status: int, error: str, *fragments: str):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == error, body
    for f in fragments:
        assert f in body["error_description"], body


# ------------------------------------------------------------------ the happy path
def test_alice_gets_a_run_bound_grant_and_data_token(token_service, facility):
    user = facility.token("alice")
    r = grant_for(token_service, user)
    assert r.status_code == 200, r.text
    grant = r.json()["access_token"]
    g = claims_of(grant)
    assert g["iss"] == token_service.issuer and g["aud"] == "visitflow" and g["sub"] == claims_of(user)["sub"]
    assert g["act"] == {"sub": "blueapi"} and g["preferred_username"] == "alice"
    assert ScopeSet.parse(g["scope"]) == grant_scopes("saxs_average", "a1", "r1")
    assert g["exp"] - g["iat"] == 86400, "T_grant: the service's lifetime, long enough for a queued post run"
    r = data_for(token_service, grant)
    assert r.status_code == 200, r.text
    body = r.json()
    d = claims_of(body["access_token"])
    assert d["aud"] == "tiled" and d["act"] == {"sub": "visitflow", "act": {"sub": "blueapi"}}
    assert ScopeSet.parse(d["scope"]) == data_token_scopes("a1", "r1", analysis="saxs_average")
    assert d["exp"] <= g["exp"]
    refreshed = token_service.post({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
                                   auth=("visitflow", "ts-visitflow-secret"))
    assert refreshed.status_code == 200, refreshed.text
    assert ScopeSet.parse(claims_of(refreshed.json()["access_token"])["scope"]) == data_token_scopes(
        "a1", "r1", analysis="saxs_average")


def test_data_token_never_outlives_its_grant(token_service, facility):
    """A grant about to expire yields a data token that expires with it (lifetime cap)."""
    kid, key = token_service.signing_key()
    now = int(time.time())
    short = jwt.encode({"iss": token_service.issuer, "sub": "alice", "aud": "visitflow", "azp": "blueapi",
                        "preferred_username": "alice", "exp": now + 40, "iat": now, "jti": "short-grant",
                        "scope": str(grant_scopes("saxs_average", "a1", "r1")), "act": {"sub": "blueapi"}},
                       key, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})
    r = data_for(token_service, short)
    assert r.status_code == 200, r.text
    assert claims_of(r.json()["access_token"])["exp"] <= now + 40


# ------------------------------------------------------------------ the authority's refusals
def test_carol_is_refused_with_opas_reason(token_service, facility):
    r = grant_for(token_service, facility.token("carol"))
    refusal(r, 403, "access_denied", "the authority refused", "carol may not start analyses on session a1")


def test_bob_is_refused_alices_session_and_gets_his_own(token_service, facility):
    refusal(grant_for(token_service, facility.token("bob")), 403, "access_denied", "bob is neither a member of session a1")
    assert grant_for(token_service, facility.token("bob"), visit="a2").status_code == 200


def test_a_facility_token_must_name_what_it_asks_for(token_service, facility):
    user = facility.token("alice")
    refusal(token_service.exchange_response(user, "blueapi", audience="visitflow"), 403, "invalid_scope",
            "carries no visit scopes")
    refusal(token_service.exchange_response(user, "blueapi", audience="visitflow", scope="run:*:a1"),
            403, "access_denied", "names no analysis")
    refusal(token_service.exchange_response(user, "blueapi", audience="visitflow", scope="openid read:raw:a1"),
            403, "access_denied", "not one the token service mints")
    refusal(token_service.exchange_response(user, "blueapi", audience="visitflow", scope="read:raw:a1/../x"),
            403, "invalid_scope")


def test_no_users_no_password_grant(token_service):
    r = token_service.post({"grant_type": "password", "username": "alice", "password": "alice",
                            "client_id": "visitflow-cli"})
    refusal(r, 401, "invalid_client")
    r = token_service.post({"grant_type": "password", "username": "alice", "password": "alice"},
                           auth=("blueapi", "ts-blueapi-secret"))
    refusal(r, 400, "unsupported_grant_type")
    import httpx
    doc = httpx.get(f"{token_service.issuer}/.well-known/openid-configuration").json()
    assert "password" not in doc["grant_types_supported"]


def test_clients_are_authenticated(token_service, facility):
    r = token_service.exchange_response(facility.token("alice"), "blueapi", secret="blueapi-dev-secret",
                                        audience="visitflow", scope=str(grant_scopes("saxs_average", "a1", "r1")))
    refusal(r, 401, "invalid_client")


# ------------------------------------------------------------------ bad subject tokens
def test_bad_subject_tokens_are_all_refused_with_reasons(token_service, facility, keycloak, idp):
    """untrusted issuer, wrong aud, expired, alg none, HS/RS confusion, ID token, another
    run's grant, our own tokens in the wrong hop: 0 accepted, 0 500.  Keycloak makes the bad
    tokens it can make (its ID and refresh tokens, another realm's token, a short-lived
    client's expired token, a service account's token for another audience); the rest are
    Keycloak's real claims re-signed by an attacker.  (A *trusted* key signing an ID-typed
    token: tests/token_service/test_keycloak.py::test_id_token_with_tiled_audience_is_still_no_access_token.)"""
    from tests.fixtures.keycloak_fixtures import SHORT_CLIENT, SHORT_LIFESPAN

    short = facility.token("alice", client_id=SHORT_CLIENT)
    expires = claims_of(short)["exp"]
    scope = str(grant_scopes("saxs_average", "a1", "r1"))
    alice = facility.token("alice")
    good = claims_of(alice)
    assert good["iss"] == facility.issuer and {"blueapi", "tiled"} <= set(good["aud"])
    login = facility.login("alice", scope="openid")
    kid, _ = facility.signing_key()
    grant_r1 = grant_for(token_service, alice).json()["access_token"]
    data_r1 = data_for(token_service, grant_r1).json()["access_token"]
    cases = {
        "untrusted issuer (the dev IdP)": (idp.token("alice"), "blueapi", "visitflow", scope, "is not trusted"),
        "another realm of the same Keycloak": (keycloak.other_realm_token(), "blueapi", "visitflow", scope,
                                               "is not trusted"),
        "untrusted issuer, Keycloak's kid": (facility.forge({**good, "iss": "http://evil.example"}), "blueapi",
                                             "visitflow", scope, "is not trusted"),
        "unknown key under Keycloak's kid": (facility.forge(good), "blueapi", "visitflow", scope, "signature"),
        "wrong aud (Keycloak's tiled service account)": (facility.client_token("tiled", "tiled-dev-secret"),
                                                         "blueapi", "visitflow", scope, "audience"),
        "alg none": (jwt.encode(good, None, algorithm="none", headers={"kid": kid, "typ": "at+jwt"}),
                     "blueapi", "visitflow", scope, "algorithm"),
        "HS256 with Keycloak's public key": (_hs256_with_public_key(facility, good), "blueapi", "visitflow", scope,
                                             "algorithm"),
        "Keycloak's ID token": (login["id_token"], "blueapi", "visitflow", scope, "audience is not blueapi"),
        "Keycloak's refresh token": (login["refresh_token"], "blueapi", "visitflow", scope, "algorithm"),
        "garbage": ("not.a.jwt", "blueapi", "visitflow", scope, "malformed"),
        "another run's grant": (grant_r1, "visitflow", "tiled", str(data_token_scopes("a1", "r2", analysis="saxs_average")), "does not cover"),
        "a grant as blueapi's subject": (grant_r1, "blueapi", "visitflow", str(grant_scopes("saxs_average", "a1", "r2")),
                                         "not within the subject token's audience"),
        "a data token re-exchanged": (data_r1, "visitflow", "tiled", str(data_token_scopes("a1", "r1", analysis="saxs_average")),
                                      "not within the subject token's audience"),
    }
    accepted, errors = [], []

    def check(name, token, client, aud, sc, reason):
        r = token_service.exchange_response(token, client, audience=aud, scope=sc)
        if r.status_code == 200:
            accepted.append(name)
        elif r.status_code >= 500:
            errors.append((name, r.text))
        else:
            assert r.status_code in (401, 403), (name, r.status_code, r.text)
            assert reason in r.json()["error_description"], (name, r.json())

    for name, case in cases.items():
        check(name, *case)
    # Keycloak's own expired token (5 s client), past exp plus the token service's 10 s leeway
    assert claims_of(short)["exp"] - claims_of(short)["iat"] == SHORT_LIFESPAN
    time.sleep(max(0.0, expires + 11 - time.time()))
    check("expired (Keycloak's short-lived client)", short, "blueapi", "visitflow", scope, "expired")
    assert accepted == [] and errors == []


# ------------------------------------------------------------------ membership changes, OPA down
def test_removed_from_the_session_the_next_exchange_is_refused(token_service, facility, opa):
    alice = facility.token("alice")
    grant = grant_for(token_service, alice).json()["access_token"]
    try:
        opa.set_data("facility/sessions/a1/members", ["carol"])
        opa.set_data("facility/sessions/a1/analysts", [])
        deadline = time.monotonic() + 10  # the token service caches decisions for 2 s
        while True:
            r = grant_for(token_service, alice, run="r-after-removal")
            if r.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        refusal(r, 403, "access_denied", "alice is neither a member of session a1")
        # her running delegation loses the data too: the second hop asks again (within the
        # cache window: a decision about this grant's run may still be cached for 2 s)
        deadline = time.monotonic() + 10
        while (r := data_for(token_service, grant)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        refusal(r, 403, "access_denied", "alice is neither a member of session a1")
    finally:
        opa.reset_data()


def test_opa_down_is_a_503_with_a_reason_and_nothing_minted(token_service, facility, opa):
    alice = facility.token("alice")
    grant = grant_for(token_service, alice).json()["access_token"]
    time.sleep(2.2)  # let cached decisions lapse
    try:
        opa.down()
        for r in (grant_for(token_service, alice, run="r-opa-down"), data_for(token_service, grant, run="r1")):
            refusal(r, 503, "temporarily_unavailable", "cannot ask the authority", "cannot be reached")
            assert "access_token" not in r.json()
    finally:
        opa.up()
    assert grant_for(token_service, alice, run="r-opa-back").status_code == 200


# ------------------------------------------------------------------ restarts, revocation, rotation
def test_restart_keeps_keys_and_revocations(token_service, facility):
    alice = facility.token("alice")
    kept = grant_for(token_service, alice, run="r-kept").json()["access_token"]
    revoked = grant_for(token_service, alice, run="r-revoked").json()["access_token"]
    assert token_service.revoke(revoked, "visitflow").status_code == 200  # the audience may revoke
    refusal(data_for(token_service, revoked, run="r-revoked"), 401, "invalid_token", "revoked")
    token_service.restart()
    assert data_for(token_service, kept, run="r-kept").status_code == 200
    refusal(data_for(token_service, revoked, run="r-revoked"), 401, "invalid_token", "revoked")


def test_key_rotation_reaches_new_tokens_old_grants_still_work(token_service, facility):
    alice = facility.token("alice")
    old = grant_for(token_service, alice, run="r-rot").json()["access_token"]
    subprocess.run([sys.executable, "-m", "visitflow.cli", "idp", "--rotate-keys", "--keys-dir",
                    str(token_service.keys_dir)], check=True, capture_output=True)
    new = grant_for(token_service, alice, run="r-rot2").json()["access_token"]
    assert jwt.get_unverified_header(new)["kid"] != jwt.get_unverified_header(old)["kid"]
    assert data_for(token_service, old, run="r-rot").status_code == 200
    assert data_for(token_service, new, run="r-rot2").status_code == 200
