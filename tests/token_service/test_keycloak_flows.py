"""Real Prefect flow runs, live and post, on Keycloak-issued tokens (grant_scope=visit).

A Tiled and a Prefect server + worker of their own, wired to the running Keycloak (the
session's stack is wired to the dev IdP): alice logs in at Keycloak, scans into Tiled with
her token, blueapi's exchange gives the visit grant (stored as the Prefect Secret the trigger
would store), and the deployed analysis flows obtain their data tokens from Keycloak through
the ScopedCredentials block.  Results must equal numpy on the raw frames.
"""

from __future__ import annotations

import os
import threading

import pytest

from tests.fixtures.prefect_fixtures import running_prefect
from tests.fixtures.scans import run_scan, start_scan_thread, user_root
from tests.fixtures.references import assert_matches, reference_of
from tests.flow.test_flows_e2e import state_of
from tests.fixtures.tiled_fixtures import running_tiled
from visitflow.core.scopes import grant_scopes
from visitflow.flow.sink import read_result

pytestmark = [pytest.mark.keycloak, pytest.mark.e2e]


@pytest.fixture(scope="module")
def kc_stack(keycloak, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kc-stack")
    with running_tiled(keycloak, tmp / "tiled") as tiled, \
            running_prefect(tmp / "prefect", issuer=keycloak.issuer, tiled_uri=tiled.uri, grant_scope="visit",
                            home=tmp / "prefect" / "home",
                            database_url=os.environ.get("VISITFLOW_TEST_KEYCLOAK_PREFECT_DATABASE_URL")) as stack:
        yield tiled, stack


def delegate(keycloak, stack, analysis: str, uid: str) -> str:
    """What the trigger does at run start, against Keycloak: the visit grant, stored."""
    grant = keycloak.exchange(keycloak.token("alice"), "blueapi", audience="visitflow",
                              scope=str(grant_scopes(analysis, "a1", uid, "visit")), refresh=True)["access_token"]
    stack.store_grant(analysis, "a1", uid, grant)
    return grant


@pytest.mark.parametrize("analysis", ["saxs_average", "peak_stats"])
def test_post_run_on_keycloak_tokens(keycloak, kc_stack, analysis):
    tiled, stack = kc_stack
    uid = run_scan(tiled.uri, keycloak.token("alice"), num=12)
    delegate(keycloak, stack, analysis, uid)
    run = stack.run(analysis, "post", "a1", uid)
    assert state_of(run)[0] == "COMPLETED", (state_of(run), stack.logs(run["id"]))
    root = user_root(tiled.uri, keycloak.token("alice"))
    node = root[f"processed/a1/{uid}/{analysis}"]
    assert_matches(read_result(node), reference_of(analysis, root[f"raw/a1/{uid}/primary"]))
    meta = node[node.metadata["current"]].metadata
    assert meta["status"] == "complete" and meta["frames_processed"] == 12
    # provenance as Keycloak issues it: the user's UUID, the requesting client, no act
    assert meta["token_sub"] == keycloak.user_id("alice") and meta["token_azp"] == "visitflow"
    assert not meta.get("token_act")


def test_live_run_during_scan_on_keycloak_tokens(keycloak, kc_stack):
    tiled, stack = kc_stack
    created = {}

    def on_start(name, doc):
        if name == "start":
            def go():
                delegate(keycloak, stack, "saxs_average", doc["uid"])
                created["live"] = stack.run("saxs_average", "live", "a1", doc["uid"], wait=False)
            threading.Thread(target=go, daemon=True).start()

    thread, out = start_scan_thread(tiled.uri, keycloak.token("alice"), num=20, delay=0.3, subscribers=[on_start])
    thread.join(180)
    assert not thread.is_alive(), "the scan did not finish"
    uid = out["uid"]
    live = stack.api.wait_for_flow_run(created["live"]["id"], timeout=300)
    assert state_of(live)[0] == "COMPLETED", (state_of(live), stack.logs(live["id"]))
    root = user_root(tiled.uri, keycloak.token("alice"))
    live_node = root[f"processed/a1/{uid}/saxs_average"]["live"]
    assert live_node.metadata["status"] == "complete" and live_node.metadata["frames_processed"] == 20
    assert_matches({k: live_node[k].read() for k in live_node}, reference_of("saxs_average", root[f"raw/a1/{uid}/primary"]))
