"""The dev IdP against a real server process: grants, RFC 8693 exchange rules, refresh and
session bounds, introspection, revocation, key rotation, and refusals of bad tokens."""

import base64
import subprocess
import sys
import time

import httpx
import jwt
import pytest
import yaml

from visitflow.core.tokens import TokenValidator, unverified_claims
from visitflow.errors import InvalidToken

from tests.fixtures.idp_fixtures import IDP_CONFIG, start_idp

UID = "0f9c1e4a-run1"
GRANT = f"run:saxs_average:a1 read:raw:a1/{UID} write:processed:a1/{UID}"
DATA = f"read:raw:a1/{UID} write:processed:a1/{UID}"


def decode(token):
    return unverified_claims(token)


def test_discovery_and_jwks(idp):
    doc = httpx.get(f"{idp.issuer}/.well-known/openid-configuration").json()
    assert doc["issuer"] == idp.issuer
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in doc["grant_types_supported"]
    keys = httpx.get(doc["jwks_uri"]).json()["keys"]
    assert keys and all(k["kty"] == "RSA" and k["alg"] == "RS256" and k["kid"] for k in keys)
    assert all("d" not in k for k in keys), "private key material in the JWKS"


def test_password_login_token_validates(idp):
    body = idp.login("alice")
    claims = TokenValidator(idp.issuer, "tiled").validate(body["access_token"])
    assert claims.sub == "alice" and set(claims.audiences) == {"blueapi", "tiled"}
    assert claims.scopes.may_run("saxs_average", "a1") and claims.scopes.allows("read", "raw", "a1", "x")
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
    assert body["refresh_token"] and body["expires_in"] == 300


@pytest.mark.parametrize("auth_style", ["basic", "post"])
def test_client_authentication_methods(idp, auth_style):
    form = {"grant_type": "client_credentials"}
    if auth_style == "basic":
        r = idp.post(form, auth=("visitflow-admin", "admin-dev-secret"))
    else:
        r = idp.post({**form, "client_id": "visitflow-admin", "client_secret": "admin-dev-secret"})
    assert r.status_code == 200, r.text
    claims = decode(r.json()["access_token"])
    assert claims["sub"] == "service-account-visitflow-admin" and claims["scope"] == "visitflow:admin"
    assert "refresh_token" not in r.json()


@pytest.mark.parametrize("form,auth,status,error", [
    ({"grant_type": "client_credentials"}, ("blueapi", "wrong"), 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, ("nobody", "x"), 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, None, 401, "invalid_client"),
    ({"grant_type": "password", "client_id": "visitflow-cli", "username": "alice", "password": "nope"}, None, 400, "invalid_grant"),
    ({"grant_type": "password", "client_id": "visitflow-cli", "username": "alice", "password": "alice",
      "scope": "read:data:a2"}, None, 403, "invalid_scope"),
    ({"grant_type": "password", "client_id": "visitflow-cli", "username": "alice", "password": "alice",
      "scope": "read:disk:a1"}, None, 403, "invalid_scope"),
    ({"grant_type": "password", "username": "alice", "password": "alice"}, ("blueapi", "blueapi-dev-secret"), 403, "unauthorized_client"),
    ({"grant_type": "client_credentials", "client_id": "visitflow-cli"}, None, 403, "unauthorized_client"),
    ({"grant_type": "authorization_code", "client_id": "visitflow-cli"}, None, 400, "unsupported_grant_type"),
    ({"grant_type": "refresh_token", "client_id": "visitflow-cli", "refresh_token": "forged"}, None, 400, "invalid_grant"),
])
def test_token_endpoint_errors_are_rfc6749(idp, form, auth, status, error):
    r = idp.post(form, auth=auth)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and body["error_description"]
    assert r.headers["cache-control"] == "no-store"


def test_malformed_basic_header_is_401(idp):
    r = httpx.post(idp.token_url, data={"grant_type": "client_credentials"},
                   headers={"Authorization": "Basic !!!notbase64"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


def test_password_grant_narrows(idp):
    body = idp.login("alice", scope="read:raw:a1 openid")
    assert body["scope"] == "openid read:raw:a1"
    assert decode(body["id_token"])["aud"] == "visitflow-cli"
    assert jwt.get_unverified_header(body["id_token"])["typ"] == "JWT"


def test_two_hop_delegation(idp):
    user = idp.token("alice")
    grant = idp.exchange(user, "blueapi", audience="visitflow", scope=GRANT)
    g = decode(grant["access_token"])
    assert g["aud"] == "visitflow" and g["sub"] == "alice" and g["azp"] == "blueapi"
    assert g["act"] == {"sub": "blueapi"}
    assert set(g["scope"].split()) == set(GRANT.split())
    assert 86000 < g["exp"] - g["iat"] <= 86400, "T_grant lifetime comes from the visitflow audience"
    assert grant["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert "refresh_token" not in grant, "a refresh token only when asked for (requested_token_type)"

    data = idp.exchange(grant["access_token"], "visitflow", audience="tiled", scope=DATA, refresh=True)
    d = decode(data["access_token"])
    assert d["aud"] == "tiled" and d["sub"] == "alice" and d["act"] == {"sub": "visitflow", "act": {"sub": "blueapi"}}
    assert d["exp"] - d["iat"] == 300 and data["refresh_token"]

    refreshed = idp.post({"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
                         auth=("visitflow", "visitflow-dev-secret"))
    assert refreshed.status_code == 200, refreshed.text
    r = decode(refreshed.json()["access_token"])
    assert r["act"] == d["act"] and r["scope"] == d["scope"] and r["jti"] != d["jti"]


def test_exchange_without_scope_keeps_subject_scope(idp):
    user = idp.token("alice")
    g = decode(idp.exchange(user, "blueapi", audience="visitflow")["access_token"])
    assert set(g["scope"].split()) == set(decode(user)["scope"].split())


@pytest.mark.parametrize("who,client,audience,scope,status,error", [
    ("alice", "blueapi", "visitflow", "run:peak_stats:a2", 403, "invalid_scope"),       # other visit
    ("carol", "blueapi", "visitflow", GRANT, 403, "invalid_scope"),                    # may not run analyses
    ("alice", "blueapi", "visitflow", "write:raw:a1 read:data:a1 admin", 403, "invalid_scope"),
    ("alice", "blueapi", "nowhere", GRANT, 403, "invalid_target"),                      # unknown audience
    ("alice", "blueapi", "tiled", DATA, 403, "access_denied"),                          # audience not allowed for blueapi
    ("alice", "visitflow", "tiled", DATA, 403, "access_denied"),                        # visitflow not in alice's aud
    ("alice", "tiled", "tiled", DATA, 403, "unauthorized_client"),                      # tiled may not exchange
])
def test_exchange_refusals(idp, who, client, audience, scope, status, error):
    r = idp.exchange_response(idp.token(who), client, audience=audience, scope=scope)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error, r.text


def test_exchange_cannot_widen_along_the_chain(idp):
    grant, _ = idp.delegate(idp.token("alice"), "a1", UID)
    # The grant names one run; the data token may not ask for the visit, or another run.
    for scope in ("read:raw:a1", "read:raw:a1/other-run", "write:raw:a1/" + UID, "read:processed:a1/" + UID):
        r = idp.exchange_response(grant, "visitflow", audience="tiled", scope=scope)
        assert r.status_code == 403 and r.json()["error"] == "invalid_scope", (scope, r.text)


def test_refresh_token_rotation_and_reuse_detection(idp):
    body = idp.login("alice")
    first = idp.post({"grant_type": "refresh_token", "client_id": "visitflow-cli", "refresh_token": body["refresh_token"]})
    assert first.status_code == 200
    reuse = idp.post({"grant_type": "refresh_token", "client_id": "visitflow-cli", "refresh_token": body["refresh_token"]})
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    # Reuse of a rotated token revokes the whole session, including the newer refresh token.
    second = idp.post({"grant_type": "refresh_token", "client_id": "visitflow-cli",
                       "refresh_token": first.json()["refresh_token"]})
    assert second.status_code == 400
    other_client = idp.post({"grant_type": "refresh_token", "refresh_token": idp.login("alice")["refresh_token"]},
                            auth=("visitflow", "visitflow-dev-secret"))
    assert other_client.status_code == 400 and "another client" in other_client.json()["error_description"]


def test_introspection_and_revocation(idp):
    token = idp.token("alice")
    tiled_auth = ("tiled", "tiled-dev-secret")
    r = httpx.post(f"{idp.issuer}/introspect", data={"token": token}, auth=tiled_auth).json()
    assert r["active"] is True and r["sub"] == "alice" and "read:data:a1" in r["scope"]
    assert httpx.post(f"{idp.issuer}/introspect", data={"token": "garbage"}, auth=tiled_auth).json() == {"active": False}
    denied = httpx.post(f"{idp.issuer}/introspect", data={"token": token}, auth=("blueapi", "blueapi-dev-secret"))
    assert denied.status_code == 403
    assert httpx.post(f"{idp.issuer}/revoke", data={"token": token, "client_id": "visitflow-cli"}).status_code == 200
    assert httpx.post(f"{idp.issuer}/introspect", data={"token": token}, auth=tiled_auth).json() == {"active": False}
    r = idp.exchange_response(token, "blueapi", audience="visitflow", scope=GRANT)
    assert r.status_code == 401 and "revoked" in r.json()["error_description"]


# ---------------------------------------------------------------- bad tokens at the IdP
def bad_tokens(idp):
    now = int(time.time())
    c = idp.claims
    hs256 = jwt.api_jws.PyJWS()
    hs256._algorithms["HS256"].prepare_key = lambda key: key  # let pyjwt sign with a PEM "secret"
    forged_hs = hs256.encode(jwt.utils.force_bytes(__import__("json").dumps(c())), idp.public_pem(), algorithm="HS256",
                             headers={"kid": idp.signing_key()[0], "typ": "at+jwt"})
    unsigned = (base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode() + "." +
                base64.urlsafe_b64encode(__import__("json").dumps(c()).encode()).rstrip(b"=").decode() + ".")
    good = idp.sign(c())
    head, body, sig = good.split(".")
    tampered_body = base64.urlsafe_b64encode(
        __import__("json").dumps(c(scope="read:data:a1 read:data:a2")).encode()).rstrip(b"=").decode()
    return {
        "expired": idp.sign(c(exp=now - 600, iat=now - 900, nbf=now - 900)),
        "not_yet_valid": idp.sign(c(nbf=now + 600)),
        "issued_in_future": idp.sign(c(iat=now + 600, nbf=None)),
        "wrong_issuer": idp.sign(c(iss="http://evil.example")),
        "unknown_kid": idp.sign(c(), headers={"kid": "no-such-key"}),
        "bad_signature": idp.sign(c(), key=idp.other_key),
        "tampered_payload": f"{head}.{tampered_body}.{sig}",
        "alg_none": unsigned,
        "hs256_with_public_key": forged_hs,
        "id_token": idp.sign(c(typ="ID", nonce="n"), headers={"typ": "JWT"}),
        "wrong_typ_header": idp.sign(c(), headers={"typ": "dpop+jwt"}),
        "missing_exp": idp.sign(c(exp=None)),
        "missing_sub": idp.sign(c(sub=None)),
        "garbage": "not.a.jwt",
        "empty": "",
    }


BAD_CASES = ["expired", "not_yet_valid", "issued_in_future", "wrong_issuer", "unknown_kid", "bad_signature",
             "tampered_payload", "alg_none", "hs256_with_public_key", "id_token", "wrong_typ_header", "missing_exp",
             "missing_sub", "garbage", "empty"]


@pytest.fixture(scope="module")
def bad(idp):
    return bad_tokens(idp)


def test_control_token_is_accepted(idp):
    """The matrix below is only meaningful if a well-formed token signed the same way works."""
    r = idp.exchange_response(idp.sign(idp.claims()), "blueapi", audience="visitflow", scope=GRANT)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_subject_token_refused_at_exchange(idp, bad, case):
    r = idp.exchange_response(bad[case], "blueapi", audience="visitflow", scope=GRANT)
    assert r.status_code == 401, (case, r.status_code, r.text)
    assert r.json()["error"] == "invalid_token" and r.json()["error_description"].startswith("subject_token")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_bearer_refused_at_userinfo(idp, bad, case):
    r = httpx.get(f"{idp.issuer}/userinfo", headers={"Authorization": f"Bearer {bad[case]}".strip()})
    assert r.status_code == 401, (case, r.text)
    assert r.json()["error_description"] and r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_tokens_refused_by_validator(idp, bad, case):
    with pytest.raises(InvalidToken) as info:
        TokenValidator(idp.issuer, ["blueapi", "tiled"]).validate(bad[case])
    assert info.value.status == 401 and info.value.reason


def test_validator_wrong_audience(idp):
    with pytest.raises(InvalidToken, match="audience"):
        TokenValidator(idp.issuer, "visitflow").validate(idp.token("alice"))


# ---------------------------------------------------------------- rotation and lifetimes
def test_key_rotation(idp):
    validator = TokenValidator(idp.issuer, "tiled", min_refetch_interval=0)
    old = idp.token("alice")
    validator.validate(old)
    old_kid = jwt.get_unverified_header(old)["kid"]
    out = subprocess.run([sys.executable, "-m", "visitflow.cli", "idp", "--rotate-keys", "--keys-dir", str(idp.keys_dir)],
                         capture_output=True, text=True, check=True)
    assert "new signing key" in out.stdout
    new = idp.token("alice")
    assert jwt.get_unverified_header(new)["kid"] != old_kid
    validator.validate(new)   # unknown kid -> JWKS refetched
    validator.validate(old)   # old key still published


@pytest.fixture(scope="module")
def short_idp(tmp_path_factory):
    """A second IdP whose grant lives 3 s, so session bounds can be observed."""
    cfg = yaml.safe_load(IDP_CONFIG.read_text())
    cfg["audiences"]["visitflow"] = {"access": 3}
    cfg["lifetimes"]["refresh"] = 60
    tmp = tmp_path_factory.mktemp("short-idp")
    path = tmp / "idp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    handle = start_idp(tmp, path)
    yield handle
    handle.service.stop()


def test_refresh_bounded_by_delegated_session(short_idp):
    grant, _ = short_idp.delegate(short_idp.token("alice"), "a1", UID)
    data = short_idp.exchange(grant, "visitflow", audience="tiled", scope=DATA, refresh=True)
    assert data["refresh_expires_in"] <= 3, "refresh may not outlive the grant it came from"
    time.sleep(4)
    r = short_idp.post({"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
                       auth=("visitflow", "visitflow-dev-secret"))
    assert r.status_code == 400 and "expired" in r.json()["error_description"]
    r = short_idp.exchange_response(grant, "visitflow", audience="tiled", scope=DATA)
    assert r.status_code == 401 and "expired" in r.json()["error_description"]


def test_non_string_kid_is_a_401_not_a_500(idp):
    good = idp.sign(idp.claims())
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":12345,"typ":"at+jwt"}').rstrip(b"=").decode()
    token = header + good[good.index("."):]
    with pytest.raises(InvalidToken):
        TokenValidator(idp.issuer, "tiled").validate(token)
    r = idp.exchange_response(token, "blueapi", audience="visitflow", scope=GRANT)
    assert r.status_code == 401, r.text


def test_user_claims_reach_login_tokens_and_reserved_ones_are_refused(tmp_path):
    """``claims`` per user (blueapi's ``fedid``) appear in login and refreshed tokens only."""
    from visitflow.token_service.config import IdPConfig
    from visitflow.errors import ConfigError

    config = yaml.safe_load(IDP_CONFIG.read_text())
    config["users"]["alice"]["claims"] = {"fedid": "ali12345"}
    path = tmp_path / "idp.yaml"
    path.write_text(yaml.safe_dump(config))
    handle = start_idp(tmp_path, config=path)
    try:
        body = handle.login("alice")
        claims = unverified_claims(body["access_token"])
        assert claims["fedid"] == "ali12345" and claims["sub"] == "alice"
        refreshed = handle.post({"grant_type": "refresh_token", "refresh_token": body["refresh_token"],
                                 "client_id": "visitflow-cli"}).json()
        assert unverified_claims(refreshed["access_token"])["fedid"] == "ali12345"
        assert "fedid" not in unverified_claims(handle.token("bob"))
    finally:
        handle.service.stop()
    config["users"]["alice"]["claims"] = {"sub": "mallory"}
    with pytest.raises(ConfigError, match="set by the IdP"):
        IdPConfig.from_dict(config)
