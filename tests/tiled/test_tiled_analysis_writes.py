"""Per-analysis writes (issue 20, finding 6), on the real token service and real Tiled.

Data tokens now carry ``write:processed:<visit>/<run>/<analysis>`` (visitflow.core.scopes).
Two analyses of one run — ``saxs_average`` and ``peak_stats``, each with the real two-hop
delegation (user token -> grant -> data token) — may each create the run container they
need and their own analysis node, write and replace their own results and ``current``
pointer, and cannot write, replace or delete the other's.  A data token of the old,
run-wide form (a grant minted before this change) still works, as documented.
"""

from __future__ import annotations

import pytest

from visitflow.core.scopes import data_token_scopes, grant_scopes

from tests.fixtures.scans import run_scan

pytestmark = pytest.mark.security


def _data_token(idp, user_token, uid, analysis):
    grant = idp.exchange(user_token, "blueapi", audience="visitflow", scope=str(grant_scopes(analysis, "a1", uid)))
    data = idp.exchange(grant["access_token"], "visitflow", audience="tiled",
                        scope=str(data_token_scopes("a1", uid, analysis=analysis)))
    assert f"write:processed:a1/{uid}/{analysis}" in data["scope"].split(), data["scope"]
    return data["access_token"]


def _create(tiled, token, parent, key, metadata=None):
    return tiled.request("POST", f"metadata/{parent}", token, json={
        "id": key, "structure_family": "container", "metadata": metadata or {}, "specs": [], "data_sources": []})


def _patch(tiled, token, path, value):
    return tiled.request("PATCH", f"metadata/{path}", token, json={
        "content-type": "application/json-patch+json", "specs": None,
        "metadata": [{"op": "add", "path": "/current", "value": value}]})


@pytest.fixture(scope="module")
def run(idp, tiled_server):
    alice = idp.token("alice")
    uid = run_scan(tiled_server.uri, alice, num=1)
    saxs, peak = _data_token(idp, alice, uid, "saxs_average"), _data_token(idp, alice, uid, "peak_stats")
    r = _create(tiled_server, peak, "processed/a1", uid, {"run_id": uid})     # the run container it needs
    assert r.status_code == 200, r.text
    for token, analysis in ((saxs, "saxs_average"), (peak, "peak_stats")):
        r = _create(tiled_server, token, f"processed/a1/{uid}", analysis)
        assert r.status_code == 200, (analysis, r.text)
        r = _create(tiled_server, token, f"processed/a1/{uid}/{analysis}", "post-1", {"status": "complete"})
        assert r.status_code == 200, (analysis, r.text)
        assert _patch(tiled_server, token, f"processed/a1/{uid}/{analysis}", "post-1").status_code == 200
    return {"uid": uid, "saxs": saxs, "peak": peak}


def test_each_analysis_writes_its_own_results_and_current_pointer(tiled_server, run):
    for analysis, token in (("saxs_average", run["saxs"]), ("peak_stats", run["peak"])):
        md = tiled_server.get(f"metadata/processed/a1/{run['uid']}/{analysis}", token).json()
        assert md["data"]["attributes"]["metadata"]["current"] == "post-1", md
    # a data token sees only its own analysis's results (it holds no read:processed scope)
    assert tiled_server.get(f"metadata/processed/a1/{run['uid']}/peak_stats", run["saxs"]).status_code in (401, 403, 404)


@pytest.mark.parametrize("attempt", ["rewrite_pointer", "replace_metadata", "add_result", "delete_result",
                                     "delete_analysis", "create_other_analysis", "edit_run_container"])
def test_one_analysis_cannot_touch_anothers_results(tiled_server, run, attempt):
    uid, peak = run["uid"], run["peak"]
    target = f"processed/a1/{uid}/saxs_average"
    r = {
        "rewrite_pointer": lambda: _patch(tiled_server, peak, target, "forged"),
        "replace_metadata": lambda: tiled_server.request("PUT", f"metadata/{target}", peak,
                                                         json={"metadata": {"current": "forged"}}),
        "add_result": lambda: _create(tiled_server, peak, target, "post-forged", {"status": "complete"}),
        "delete_result": lambda: tiled_server.request("DELETE", f"metadata/{target}/post-1", peak),
        "delete_analysis": lambda: tiled_server.request("DELETE", f"metadata/{target}", peak),
        "create_other_analysis": lambda: _create(tiled_server, peak, f"processed/a1/{uid}", "saxs_average_2"),
        "edit_run_container": lambda: _patch(tiled_server, peak, f"processed/a1/{uid}", "forged"),
    }[attempt]()
    assert r.status_code in (401, 403, 404), (attempt, r.status_code, r.text)
    # saxs_average's results and pointer are untouched
    got = tiled_server.get(f"metadata/{target}", run["saxs"])
    assert got.status_code == 200, (attempt, r.status_code, got.text)
    md = got.json()["data"]["attributes"]["metadata"]
    assert md["current"] == "post-1", md
    assert tiled_server.get(f"metadata/{target}/post-1", run["saxs"]).status_code == 200


def test_an_old_run_wide_data_token_still_writes_the_run(idp, tiled_server, run):
    """A grant minted before per-analysis scopes (``write:processed:a1/<run>``): documented to
    keep working until it expires."""
    _grant, old = idp.delegate(idp.token("alice"), "a1", run["uid"])
    r = _create(tiled_server, old, f"processed/a1/{run['uid']}", "legacy_analysis")
    assert r.status_code == 200, r.text


def test_opa_mode_per_analysis_data_tokens(facility, token_service, facility_tiled):
    """The OPA mode: alice's facility (Keycloak) token, the token service asking the real OPA
    (deployments/opa/authz.rego) before it mints, and the facility Tiled.  OPA decides at run
    granularity; the minted data token names one analysis, and Tiled holds it to that."""
    alice = facility.token("alice")
    uid = run_scan(facility_tiled.uri, alice, num=1)
    saxs = _data_token(token_service, alice, uid, "saxs_average")
    peak = _data_token(token_service, alice, uid, "peak_stats")
    assert _create(facility_tiled, saxs, "processed/a1", uid, {"run_id": uid}).status_code == 200
    assert _create(facility_tiled, saxs, f"processed/a1/{uid}", "saxs_average").status_code == 200
    assert _patch(facility_tiled, saxs, f"processed/a1/{uid}/saxs_average", "post-1").status_code == 200
    assert _create(facility_tiled, peak, f"processed/a1/{uid}", "peak_stats").status_code == 200
    for r in (_patch(facility_tiled, peak, f"processed/a1/{uid}/saxs_average", "forged"),
              facility_tiled.request("DELETE", f"metadata/processed/a1/{uid}/saxs_average", peak),
              _create(facility_tiled, peak, f"processed/a1/{uid}", "not_peak_stats")):
        assert r.status_code in (401, 403, 404), (r.status_code, r.text)
    md = facility_tiled.get(f"metadata/processed/a1/{uid}/saxs_average", saxs).json()["data"]["attributes"]
    assert md["metadata"]["current"] == "post-1"
