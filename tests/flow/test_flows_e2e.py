"""Analyses as deployed Prefect flows, end to end: real Prefect server + process worker, real
Tiled with our auth, real IdP, real RunEngine + TiledWriter scans."""

import threading
import time

import numpy as np
import pytest

from visitflow.core import names as grants
from visitflow.flow.sink import read_result

from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.scans import run_scan, start_scan_thread, user_root

pytestmark = pytest.mark.e2e

GRANT = "run:{a}:{v} read:raw:{v}/{r} write:processed:{v}/{r}"


def delegate(idp, stack, analysis, visit, uid, user="alice"):
    grant = idp.exchange(idp.token(user), "blueapi", audience="visitflow",
                         scope=GRANT.format(a=analysis, v=visit, r=uid))["access_token"]
    stack.store_grant(analysis, visit, uid, grant)
    return grant


def state_of(run):
    return run["state"]["type"], run["state"].get("message") or ""


@pytest.mark.parametrize("analysis", ["saxs_average", "peak_stats"])
def test_post_run_writes_result_with_provenance(idp, tiled_server, prefect_stack, analysis):
    alice = idp.token("alice")
    uid = run_scan(tiled_server.uri, alice, num=15)
    delegate(idp, prefect_stack, analysis, "a1", uid)
    run = prefect_stack.run(analysis, "post", "a1", uid)
    assert state_of(run)[0] == "COMPLETED", (state_of(run), prefect_stack.logs(run["id"]))
    assert run["parameters"] == {"visit": "a1", "run_id": uid}
    assert run["name"] == f"{grants.flow_name(analysis)}/post a1 {uid[:8]}"
    assert {f"visit:a1", f"run:{uid}", f"analysis:{analysis}"} <= set(run["tags"])

    root = user_root(tiled_server.uri, idp.token("alice"))  # Alice reads with her own token
    node = root[f"processed/a1/{uid}/{analysis}"]
    assert_matches(read_result(node), reference_of(analysis, root[f"raw/a1/{uid}/primary"]))
    meta = node[node.metadata["current"]].metadata
    assert meta["status"] == "complete" and meta["frames_processed"] == 15 and meta["variant"] == "post"
    assert meta["raw_uri"].endswith(f"/raw/a1/{uid}")
    assert meta["flow_run_id"] == run["id"] and meta["flow_run_name"] == run["name"]
    assert meta["deployment"] == f"{grants.flow_name(analysis)}/post"
    assert meta["code_version"].startswith(("git:", "visitflow=="))
    assert meta["token_sub"] == "alice" and meta["token_azp"] == "visitflow"
    assert meta["token_act"] == {"sub": "visitflow", "act": {"sub": "blueapi"}}

    artifacts = prefect_stack.api.request("POST", "/artifacts/filter",
                                          json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    kinds = {a["type"] for a in artifacts}
    assert {"progress", "markdown"} <= kinds, kinds


def _store(stack, idp, case, uid, other_uid):
    a, v = "saxs_average", "a1"
    if case == "missing":
        return "GrantMissing"
    if case == "other_run":  # a valid grant, for another run, stored under this run's name
        token = idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                             scope=GRANT.format(a=a, v=v, r=other_uid))["access_token"]
        stack.store_grant(a, v, uid, token)
        return "NotAuthorised"
    if case == "expired":
        now = int(time.time())
        token = idp.sign(idp.claims(aud="visitflow", azp="blueapi", exp=now - 60, iat=now - 3600, nbf=now - 3600,
                                    scope=GRANT.format(a=a, v=v, r=uid), act={"sub": "blueapi"}))
        stack.store_grant(a, v, uid, token)
        return "DelegationExpired"
    if case == "user_token":  # the user's own token is not a grant (audience)
        stack.store_grant(a, v, uid, idp.token("alice"))
        return "GrantInvalid"
    if case == "forged":
        token = idp.sign(idp.claims(aud="visitflow", scope=GRANT.format(a=a, v=v, r=uid)), key=idp.other_key)
        stack.store_grant(a, v, uid, token)
        return "GrantInvalid"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "other_run", "expired", "user_token", "forged"])
def test_bad_grants_fail_before_any_data_access(idp, tiled_server, prefect_stack, case):
    alice = idp.token("alice")
    uid = run_scan(tiled_server.uri, alice, num=3)
    error = _store(prefect_stack, idp, case, uid, other_uid="some-other-run")
    run = prefect_stack.run("saxs_average", "post", "a1", uid)
    kind, message = state_of(run)
    logs = "" if error in message else prefect_stack.logs(run["id"], wait_for=error)
    assert kind in ("FAILED", "CRASHED"), (kind, message)
    assert error in message or error in logs, (message, logs[-2000:])
    # Nothing was written for this run: the flow stopped before touching Tiled.
    assert uid not in user_root(tiled_server.uri, idp.token("alice"))["processed"]["a1"]


def _live_run_on_start(stack, idp, analysis, created):
    def callback(name, doc):
        if name == "start":
            uid = doc["uid"]

            def go():
                delegate(idp, stack, analysis, "a1", uid)
                created["live"] = stack.run(analysis, "live", "a1", uid, wait=False)

            threading.Thread(target=go, daemon=True).start()
    return callback


@pytest.mark.stream
def test_live_during_scan_matches_post(idp, tiled_server, prefect_stack):
    """The deployed live flow follows the scan by push (Tiled's websocket stream): live ==
    post == numpy, and the frames came from the stream's messages, not HTTP reads."""
    import re

    created = {}
    alice = idp.token("alice")
    thread, out = start_scan_thread(tiled_server.uri, alice, num=30, delay=0.3,
                                    subscribers=[_live_run_on_start(prefect_stack, idp, "saxs_average", created)])
    thread.join(120)
    assert not thread.is_alive(), "the scan did not finish"
    uid = out["uid"]
    live = prefect_stack.api.wait_for_flow_run(created["live"]["id"], timeout=240)
    assert state_of(live)[0] == "COMPLETED", prefect_stack.logs(live["id"])
    post = prefect_stack.run("saxs_average", "post", "a1", uid)
    assert state_of(post)[0] == "COMPLETED"
    root = user_root(tiled_server.uri, idp.token("alice"))
    node = root[f"processed/a1/{uid}/saxs_average"]
    live_meta = node["live"].metadata
    assert live_meta["frames_processed"] == 30 and live_meta["status"] == "complete"
    np.testing.assert_allclose(node["live"]["average"].read(), read_result(node)["average"], rtol=1e-6)
    assert_matches({"average": node["live"]["average"].read()},
                   reference_of("saxs_average", root[f"raw/a1/{uid}/primary"]))
    assert node.metadata["current"].startswith("post-"), "a complete post result outranks live"
    logs = prefect_stack.logs(live["id"], wait_for="live source:")
    source = re.search(r"live source: (\{.*\})", logs)
    assert source, f"the live flow did not report its source; its last logs:\n{logs[-2000:]}"
    push_reads = int(re.search(r"'push_reads': (\d+)", source.group(1)).group(1))
    http_reads = int(re.search(r"'http_reads': (\d+)", source.group(1)).group(1))
    assert push_reads > 0 and push_reads > http_reads, source.group(1)   # HTTP only for a catch-up at start


def test_live_killed_mid_scan_resumes_from_checkpoint(idp, tiled_server, prefect_stack):
    created = {}
    alice = idp.token("alice")
    num = 40
    thread, out = start_scan_thread(tiled_server.uri, alice, num=num, delay=0.4, seed=7,
                                    subscribers=[_live_run_on_start(prefect_stack, idp, "saxs_average", created)])
    deadline = time.monotonic() + 120
    while "live" not in created and time.monotonic() < deadline:
        time.sleep(0.2)
    first = created["live"]
    run_id = first["parameters"]["run_id"]
    reader = user_root(tiled_server.uri, idp.token("alice"))
    frames_at_kill = 0
    while time.monotonic() < deadline:  # wait until the live run has checkpointed some frames
        try:
            frames_at_kill = reader[f"processed/a1/{run_id}/saxs_average/live"].metadata["frames_processed"]
        except KeyError:
            frames_at_kill = 0
        if frames_at_kill >= 5:
            break
        time.sleep(0.3)
    assert frames_at_kill >= 5, prefect_stack.logs(first["id"])
    prefect_stack.api.request("POST", f"/flow_runs/{first['id']}/set_state",
                              json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    cancelled = prefect_stack.api.wait_for_flow_run(first["id"], timeout=120)
    assert state_of(cancelled)[0] == "CANCELLED"
    assert "uid" not in out, "the kill must happen mid-scan"
    second = prefect_stack.run("saxs_average", "live", "a1", run_id, wait=False,
                               idempotency_key=f"restart-{run_id}")
    thread.join(120)
    assert not thread.is_alive(), "the scan did not finish"
    done = prefect_stack.api.wait_for_flow_run(second["id"], timeout=240)
    assert state_of(done)[0] == "COMPLETED", prefect_stack.logs(done["id"])
    node = user_root(tiled_server.uri, idp.token("alice"))[f"processed/a1/{run_id}/saxs_average"]
    assert node["live"].metadata["frames_processed"] == num
    raw = reader[f"raw/a1/{run_id}/primary/saxs"].read()
    assert raw.shape[0] == num
    np.testing.assert_allclose(node["live"]["average"].read(), raw.astype(float).mean(axis=0), rtol=1e-6)
    assert "resuming live" in prefect_stack.logs(done["id"], wait_for="resuming live")


def test_post_rerun_replaces_result(idp, tiled_server, prefect_stack):
    """A second post run writes a new version, moves ``current``, deletes the old one."""
    uid = run_scan(tiled_server.uri, idp.token("alice"), num=5)
    delegate(idp, prefect_stack, "saxs_average", "a1", uid)
    first = prefect_stack.run("saxs_average", "post", "a1", uid)
    second = prefect_stack.run("saxs_average", "post", "a1", uid, idempotency_key=f"rerun-{uid}")
    assert state_of(first)[0] == state_of(second)[0] == "COMPLETED"
    node = user_root(tiled_server.uri, idp.token("alice"))[f"processed/a1/{uid}/saxs_average"]
    assert node.metadata["current"] == f"post-{second['id'][:8]}"
    assert [k for k in node if k.startswith("post-")] == [f"post-{second['id'][:8]}"]
