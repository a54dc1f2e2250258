"""blueapi 1.21.1 in ``tiled.authentication: ServiceAccount`` mode (the mode Diamond runs):
the raw data is written by the beamline's service account, the analyses act with the
caller's rights — the hook takes the caller's token from ``begin_task``'s pass-through
headers, never from the Tiled client.

A second real ``blueapi serve`` on the same stack as tests/trigger/test_blueapi.py (fixture
``blueapi_sa``).  The service account is a client_credentials client of the dev token service
(tests/fixtures/blueapi_stack.py ``SA_CLIENT``), blueapi's own OIDC issuer: blueapi takes the
service account's token URL from ``oidc``, so the account lives in the IdP users log in with.
"""

from __future__ import annotations

import re
import types

import pytest

from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.core.tokens import unverified_claims

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.waiting import wait_until
from tests.trigger.test_blueapi import outputs_of, raw_run, run_uid, settled, wait_flow_runs, flow_runs_of

pytestmark = pytest.mark.blueapi


def _trigger_of(sa) -> types.SimpleNamespace:
    """The shape test_blueapi's outbox helpers read (``.blueapi.trigger_state``)."""
    return types.SimpleNamespace(blueapi=sa)


def test_service_account_is_what_blueapi_writes_with(blueapi, blueapi_sa):
    """Not a vacuous mode: the SA's own token is a client_credentials token of ``SA_CLIENT``
    that may write the session and start nothing."""
    sa_token = blueapi.idp.client_token(bs.SA_CLIENT, bs.SA_SECRET)
    claims = unverified_claims(sa_token)
    assert claims["sub"] == f"service-account-{bs.SA_CLIENT}"
    assert set(claims["scope"].split()) == {f"read:data:{bs.SESSION}", f"write:data:{bs.SESSION}"}
    cfg = (blueapi_sa.service.log_path.parent.parent / "blueapi.yaml").read_text()
    assert f"client_id: {bs.SA_CLIENT}" in cfg, cfg


def test_sa_mode_alice_task_triggers_live_and_post_with_her_rights(blueapi, blueapi_sa, prefect):
    alice = blueapi.token("alice")
    uid = run_uid(blueapi_sa.run(alice, "peak_scan", {"num": 10, "seed": 5}))
    run = raw_run(blueapi, alice, uid)
    assert run.metadata["start"]["user"] == bs.FEDIDS["alice"]
    assert run["primary"]["det"].read().shape == (10,)

    runs = wait_flow_runs(prefect, uid, 2)
    assert sorted(next(t for t in r["tags"] if t.startswith("variant:")) for r in runs) == ["variant:live",
                                                                                           "variant:post"]
    for r in runs:
        done = prefect.wait_for_flow_run(r["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", (r["name"], done["state"])
    _, requests = wait_until(lambda: settled(_trigger_of(blueapi_sa), uid), 60, f"trigger did not settle {uid}")
    assert sorted((r["variant"], r["state"]) for r in requests) == [("live", "done"), ("post", "done")]
    assert len(flow_runs_of(prefect, uid)) == 2

    root = connect(blueapi.tiled.uri, BearerAuth(lambda: alice))
    node = root[f"processed/{bs.SESSION}/{uid}/peak_stats"]
    want = reference_of("peak_stats", raw_run(blueapi, alice, uid)["primary"])
    for child in (node["live"], next(node[k] for k in node if k.startswith("post-"))):
        assert child.metadata["status"] == "complete"
        assert_matches(outputs_of(child), want, rtol=1e-9, atol=1e-9, where="peak_stats/")
    # Whose rights: Alice's (her token from the request), not the service account's.
    assert node["live"].metadata["token_sub"] == "alice"
    assert re.search(rf"visitflow trigger: created peak_stats/post/{bs.SESSION}/{uid} flow run", blueapi_sa.log())


def test_sa_mode_a_reader_scans_the_service_account_writes_and_her_own_rights_refuse(blueapi, blueapi_sa, prefect):
    """Erin may only read the session.  In SA mode her scan is written (by the service account),
    and the trigger asks for analyses with HER token, so the IdP refuses them: had the hook taken
    the Tiled client's token (the SA's), the refusal would name the SA or nothing at all."""
    erin = blueapi.token("erin")
    uid = run_uid(blueapi_sa.run(erin, "peak_scan", {"num": 4}))
    run = raw_run(blueapi, erin, uid)
    assert run.metadata["stop"]["exit_status"] == "success" and len(run["primary"]["det"].read()) == 4
    assert run.metadata["start"]["user"] == bs.FEDIDS["erin"]
    grants, requests = wait_until(lambda: settled(_trigger_of(blueapi_sa), uid), 90, f"trigger did not settle {uid}")
    assert {(g["analysis"], g["state"]) for g in grants} == {("peak_stats", "refused")}, grants
    assert sorted((r["variant"], r["state"]) for r in requests) == [("live", "refused"), ("post", "refused")]
    assert flow_runs_of(prefect, uid) == []
    assert re.search(rf"REFUSED \(?peak_stats\)? for visit {bs.SESSION} run {uid}: the IdP says invalid_scope",
                     blueapi_sa.log()), blueapi_sa.log()[-3000:]


def test_pass_through_mode_a_reader_cannot_write_raw_data(blueapi, prefect):
    """The same scan through the pass-through blueapi: Erin's own token is refused by Tiled, so
    no run of hers appears — the contrast that shows who writes in each mode."""
    erin = blueapi.token("erin")
    before = set(connect(blueapi.tiled.uri, BearerAuth(lambda: erin))[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"])
    task = blueapi.blueapi.run(erin, "peak_scan", {"num": 3})
    assert task["is_complete"]
    after = set(connect(blueapi.tiled.uri, BearerAuth(lambda: erin))[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"])
    assert after == before, f"a reader's pass-through scan wrote {after - before}"
    assert task["errors"] or task["outcome"]["outcome"] != "success", task
