"""Tiled at the facility: users' own tokens from the facility IdP (real Keycloak) are decided by
a real OPA; run tokens from the token service by their scopes.  Real Tiled, real
TiledWriter scans written with the user's own token (as blueapi does)."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.scans import run_scan
from visitflow.core.scopes import data_token_scopes, grant_scopes
from visitflow.core.tokens import unverified_claims

pytestmark = pytest.mark.opa


@pytest.fixture(scope="module")
def scans(facility_tiled, facility):
    """Two runs in Alice's session a1 and one in Bob's a2, written with their own tokens."""
    alice, bob = facility.token("alice"), facility.token("bob")
    return {"r1": run_scan(facility_tiled.uri, alice, num=3, seed=1),
            "r2": run_scan(facility_tiled.uri, alice, num=2, seed=2),
            "b1": run_scan(facility_tiled.uri, bob, visit="a2", num=2, seed=3)}


def data_token(ts, user_token, visit, run):
    grant = ts.exchange(user_token, "blueapi", audience="visitflow",
                        scope=str(grant_scopes("saxs_average", visit, run)))["access_token"]
    return ts.exchange(grant, "visitflow", audience="tiled",
                       scope=str(data_token_scopes(visit, run, analysis="saxs_average")))["access_token"]


def test_members_read_their_session_and_only_it(facility_tiled, facility, scans):
    t = facility_tiled
    alice, carol, bob = (facility.token(u) for u in ("alice", "carol", "bob"))
    listed = set(t.keys("raw/a1", alice))  # the session may hold other tests' runs too
    assert {scans["r1"], scans["r2"]} <= listed and scans["b1"] not in listed
    assert t.keys("raw", alice) == ["a1"] and t.keys("raw", bob) == ["a2"]
    assert t.get(f"metadata/raw/a1/{scans['r1']}/primary", carol).status_code == 200, "carol is a member"
    for path in ("raw/a1", f"raw/a1/{scans['r1']}", "processed/a1"):
        r = t.get(f"metadata/{path}", bob)
        assert r.status_code in (403, 404), (path, r.status_code, r.text)
    r = t.get(f"metadata/raw/a2/{scans['b1']}", alice)
    assert r.status_code in (403, 404)


def test_run_token_reads_its_run_only(facility_tiled, facility, token_service, scans):
    t = facility_tiled
    data = data_token(token_service, facility.token("alice"), "a1", scans["r1"])
    assert t.get(f"metadata/raw/a1/{scans['r1']}/primary", data).status_code == 200
    assert t.keys("raw/a1", data) == [scans["r1"]]
    r = t.get(f"metadata/raw/a1/{scans['r2']}", data)
    assert r.status_code in (403, 404), "the session's other run"
    assert t.get(f"metadata/raw/a2/{scans['b1']}", data).status_code in (403, 404), "another session"


def test_bad_user_tokens_are_401_with_reasons(facility_tiled, facility, keycloak):
    """Keycloak-made bad tokens where it can make them, attacker-signed ones where not."""
    from tests.fixtures.keycloak_fixtures import SHORT_CLIENT

    t = facility_tiled
    short = facility.token("alice", client_id=SHORT_CLIENT)
    login = facility.login("alice", scope="openid")
    good = unverified_claims(login["access_token"])
    bad = {"wrong aud (Keycloak's blueapi service account)": facility.client_token("blueapi", "blueapi-dev-secret"),
           "another realm of the same Keycloak": keycloak.other_realm_token(),
           "unknown key under Keycloak's kid": facility.forge(good),
           "Keycloak's ID token": login["id_token"],
           "Keycloak's refresh token": login["refresh_token"]}
    for name, token in bad.items():
        r = t.get("metadata/raw/a1", token)
        assert r.status_code == 401, (name, r.status_code, r.text)
    time.sleep(max(0.0, unverified_claims(short)["exp"] + 11 - time.time()))
    r = t.get("metadata/raw/a1", short)
    assert r.status_code == 401 and "expired" in r.text.lower(), (r.status_code, r.text)


def test_removed_member_is_refused_within_the_cache_window(facility_tiled, facility, opa, scans):
    t = facility_tiled
    alice = facility.token("alice")
    path = f"metadata/raw/a1/{scans['r1']}"
    assert t.get(path, alice).status_code == 200
    try:
        opa.set_data("facility/sessions/a1/members", ["carol"])
        deadline = time.monotonic() + 15  # Tiled caches decisions for 2 s
        while t.get(path, alice).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert t.get(path, alice).status_code in (403, 404)
        assert "a1" not in t.keys("raw", alice)
    finally:
        opa.reset_data()


def test_opa_down_user_decisions_are_503_run_tokens_unaffected(facility_tiled, facility, token_service, opa, scans):
    t = facility_tiled
    alice = facility.token("alice")
    data = data_token(token_service, alice, "a1", scans["r2"])
    time.sleep(2.2)  # cached decisions lapse
    try:
        opa.down()
        statuses = [t.get(p, alice).status_code for p in
                    (f"metadata/raw/a1/{scans['r1']}", "search/raw", "search/raw/a1")]
        assert statuses == [503, 503, 503], statuses
        r = t.get(f"metadata/raw/a1/{scans['r1']}", alice)
        assert "cannot ask the authority" in r.text
        assert t.get(f"metadata/raw/a1/{scans['r2']}", data).status_code == 200, "run tokens need no OPA"
    finally:
        opa.up()
    assert t.get(f"metadata/raw/a1/{scans['r1']}", alice).status_code == 200


def test_nodes_carry_where_they_were_created_as_tags(facility_tiled, facility, scans):
    """(store, visit, run) recorded at creation (Tiled access tags), kept across TiledWriter's
    metadata update at the stop document; a client cannot choose them."""
    t = facility_tiled
    alice = facility.token("alice")
    run = scans["r1"]

    def tags(path):
        r = t.get(f"metadata/{path}", alice)
        assert r.status_code == 200, r.text
        return r.json()["data"]["attributes"]["access_tags"]

    assert tags("raw/a1") == ["visitflow:raw:a1"]
    # a raw run and what is in it also name their writer (append-only raw data: tiled/raw_runs.py)
    for path in (f"raw/a1/{run}", f"raw/a1/{run}/primary"):
        place = [x for x in tags(path) if not x.startswith("visitflow-writer:")]
        writers = [x for x in tags(path) if x.startswith("visitflow-writer:")]
        assert place == [f"visitflow:raw:a1/{run}"] and len(writers) == 1, tags(path)
    r = t.request("POST", "metadata/processed/a1", alice, json={
        "id": "chosen-tags", "structure_family": "container", "metadata": {}, "specs": [], "data_sources": [],
        "access_tags": ["visitflow:processed:a2/x"]})
    assert r.status_code == 200, r.text
    assert tags("processed/a1/chosen-tags") == ["visitflow:processed:a1/chosen-tags"]
