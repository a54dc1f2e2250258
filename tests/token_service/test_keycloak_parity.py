"""The dev IdP's Keycloak emulation (``fixed_scopes: true``) against the real Keycloak.

The same token-exchange requests go to a running Keycloak with our realm and to a dev IdP in
``fixed_scopes`` mode; their *outcomes* must agree: refused or not (and the OAuth error code
for scope refusals), the granted scopes, the audience, whether ``act`` is set, whether a
refresh token comes back, and the lifetimes.  HTTP status codes are recorded, not compared:
Keycloak answers 400 for ``invalid_scope``, the dev IdP 403 by design (visitflow/token_service/server.py).
Subjects differ on purpose (Keycloak's ``sub`` is a UUID, the dev IdP's the user name) and
are compared as "the same user in both tokens".
"""

from __future__ import annotations

import pytest

from tests.fixtures.idp_fixtures import start_fixed_scopes_idp
from visitflow.core.tokens import unverified_claims

pytestmark = pytest.mark.keycloak

VISIT_GRANT = "run:saxs_average:a1 read:data:a1 write:data:a1"
VISIT_DATA = "read:data:a1 write:data:a1"
PER_RUN = "run:saxs_average:a1 read:raw:a1/r1 write:processed:a1/r1"


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    idp = start_fixed_scopes_idp(tmp_path_factory.mktemp("kc-emulation"))
    yield idp
    idp.service.stop()


def outcome(resp, user_sub: str) -> dict:
    """What a caller can observe of an exchange, in IdP-independent terms."""
    body = resp.json()
    if resp.status_code != 200:
        out = {"refused": True}
        if body.get("error") == "invalid_scope":
            out["error"] = "invalid_scope"
        elif body.get("error") == "invalid_request" and "requested_token_type" in body.get("error_description", ""):
            out["error"] = "no refresh token for this subject"
        return out
    c = unverified_claims(body["access_token"])
    aud = c.get("aud")
    return {
        "refused": False,
        "scope": sorted(c.get("scope", "").split()),
        "aud": sorted([aud] if isinstance(aud, str) else aud or []),
        "same user": c["sub"] == user_sub,
        "act": "act" in c,
        "refresh": bool(body.get("refresh_token")),
        # lifetimes to the minute: both run in the same second-ish, Keycloak rounds nothing
        "expires_in_min": round(body["expires_in"] / 60),
        "refresh_expires_in_min": round(body.get("refresh_expires_in", 0) / 60) if body.get("refresh_token") else 0,
    }


def _sub(idp, token: str) -> str:
    return unverified_claims(token)["sub"]


# (name, hop-1 scope, hop-1 refresh, hop-2 scope or None, hop-2 refresh)
CASES = [
    ("visit grant", VISIT_GRANT, False, None, False),
    ("visit grant, refreshable", VISIT_GRANT, True, None, False),
    ("no scope parameter", None, False, None, False),
    ("per-run scopes", PER_RUN, False, None, False),
    ("a visit the user lacks", "read:data:a1 read:data:a2", False, None, False),
    ("a wildcard the user lacks", "run:*:a2", False, None, False),
    ("a wildcard that is no client scope", "run:*:a1", False, None, False),
    ("openid", "openid read:data:a1", False, None, False),
    ("data token", VISIT_GRANT, True, VISIT_DATA, False),
    ("data token with refresh", VISIT_GRANT, True, VISIT_DATA, True),
    ("data token with refresh from an access-only grant", VISIT_GRANT, False, VISIT_DATA, True),
    ("data token wider than the grant", "run:saxs_average:a1 read:data:a1", True, VISIT_DATA, True),
    ("per-run data token from a visit grant", VISIT_GRANT, True, "read:raw:a1/r1 write:processed:a1/r1", True),
    ("data token without scope", VISIT_GRANT, True, "", False),
]


def run_case(idp, case) -> dict:
    _, scope1, refresh1, scope2, refresh2 = case
    user = idp.token("alice")
    sub = _sub(idp, user)
    r1 = idp.exchange_response(user, "blueapi", audience="visitflow", scope=scope1, refresh=refresh1)
    if scope2 is None or r1.status_code != 200:
        return outcome(r1, sub)
    r2 = idp.exchange_response(r1.json()["access_token"], "visitflow", audience="tiled", scope=scope2 or None,
                               refresh=refresh2)
    return outcome(r2, sub)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulation_matches_keycloak(keycloak, emulation, case):
    got_kc = run_case(keycloak, case)
    got_dev = run_case(emulation, case)
    assert got_dev == got_kc, f"{case[0]}: Keycloak {got_kc}, dev IdP (fixed_scopes) {got_dev}"


def test_refreshed_data_token_matches(keycloak, emulation):
    out = {}
    for name, idp in (("keycloak", keycloak), ("dev", emulation)):
        user = idp.token("alice")
        grant = idp.exchange(user, "blueapi", audience="visitflow", scope=VISIT_GRANT, refresh=True)
        data = idp.exchange(grant["access_token"], "visitflow", audience="tiled", scope=VISIT_DATA, refresh=True)
        r = idp.post({"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
                     auth=("visitflow", "visitflow-dev-secret"))
        assert r.status_code == 200, (name, r.text)
        c = unverified_claims(r.json()["access_token"])
        out[name] = (c["aud"], sorted(c["scope"].split()), "act" in c, r.json()["expires_in"],
                     bool(r.json().get("refresh_token")))
    assert out["dev"] == out["keycloak"]


def test_the_comparison_can_tell_the_default_mode_apart(keycloak, idp):
    """The session's dev IdP (design mode: narrowing only, act, per-run scopes) must *differ*
    from Keycloak exactly where the design and Keycloak differ — else the parity test above
    could not fail."""
    differ = {c[0] for c in CASES if run_case(idp, c) != run_case(keycloak, c)}
    assert {"per-run scopes", "a visit the user lacks", "no scope parameter", "visit grant"} <= differ, differ
