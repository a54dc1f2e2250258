"""Faults on Prefect's highly available topology, for real (tests/fixtures/ha_fixtures.py,
visitflow/production/ha_topology.py): PostgreSQL, Redis, two API servers behind nginx, one
services process, warm workers and Tiled + the token service on network-namespace hosts.

Every fault is the real thing: SIGKILL of a process group, every process of a worker host
killed, a host's link taken down.  The checks are Prefect's own records (flow runs by
idempotency key and tag, state history, run_count) and what Tiled holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from visitflow.core import names as grants
from visitflow.errors import PrefectUnavailable
from visitflow.production.ha_recovery import PROBE_DEPLOYMENT

from tests.fixtures.scans import start_scan_thread, user_root
from tests.fixtures.waiting import wait_until

pytestmark = [pytest.mark.ha, pytest.mark.slow]


def _create(api, deployment: str, params: dict, key: str, tags: list[str], deadline: float) -> dict:
    """As the trigger's outbox does: retry an unanswered create with the same idempotency key."""
    while True:
        try:
            return api.create_flow_run(deployment, params, idempotency_key=key, tags=tags)
        except (PrefectUnavailable, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_all(api, ids, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    out = []
    for i in ids:
        out.append(api.wait_for_flow_run(i, timeout=max(5.0, deadline - time.monotonic()), interval=1.0))
    return out


def test_api_server_killed_during_burst(ha):
    """100 triggers (each delivered twice, four senders) while API server A is SIGKILLed after
    the first 30: every run is created once (Prefect's idempotency key), and completed once."""
    topo, api = ha.topo, ha.api
    tag = f"burst-{uuid.uuid4().hex[:8]}"
    keys = [f"probe/post/a1/{uuid.uuid4()}" for _ in range(100)]
    created: dict[str, tuple[str, str]] = {}
    after_kill = []
    killed = threading.Event()
    deadline = time.monotonic() + 240

    def send(key):
        a = _create(api, PROBE_DEPLOYMENT, {"seconds": 0.2}, key, [tag], deadline)
        b = _create(api, PROBE_DEPLOYMENT, {"seconds": 0.2}, key, [tag], deadline)
        created[key] = (a["id"], b["id"])
        if killed.is_set():
            after_kill.append(key)
        elif len(created) >= 30:
            killed.set()
            topo.kill("prefect-api-a")

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, keys))
        assert killed.is_set() and len(after_kill) >= 50, len(after_kill)
        assert not topo.alive("prefect-api-a"), "API server A must be dead"
        assert all(a == b for a, b in created.values()), "a duplicate delivery created a second run"
        ids = {a for a, _ in created.values()}
        assert len(ids) == 100
        finals = _wait_all(api, ids, timeout=300)
        assert [f["state"]["type"] for f in finals].count("COMPLETED") == 100, \
            {f["id"]: f["state"]["type"] for f in finals if f["state"]["type"] != "COMPLETED"}
        assert {f["run_count"] for f in finals} == {1}, "a run was started twice"
        by_tag = api.request("POST", "/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [tag]}}, "limit": 200})
        assert len(by_tag) == 100 and {r["idempotency_key"] for r in by_tag} == set(keys)
    finally:
        topo.api_server("a").wait_ready(180)


def test_services_restart_keeps_queued_events(ha):
    """The services process SIGKILLed: API servers and workers carry on (a run completes);
    the run's events wait in Redis and are persisted when services start again."""
    topo, api = ha.topo, ha.api
    topo.kill("prefect-services")
    try:
        fr = _create(api, PROBE_DEPLOYMENT, {"seconds": 0.1}, f"probe/post/a1/{uuid.uuid4()}", [],
                     time.monotonic() + 60)
        done = api.wait_for_flow_run(fr["id"], timeout=120)
        assert done["state"]["type"] == "COMPLETED"
        query = {"filter": {"any_resource": {"id": [f"prefect.flow-run.{fr['id']}"]},
                            "event": {"name": ["prefect.flow-run.Completed"]},
                            "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 10}
        assert api.request("POST", "/events/filter", json=query)["events"] == [], \
            "no services process: nothing persists events"
    finally:
        topo.services_process()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        events = api.request("POST", "/events/filter", json=query)["events"]
        if events:
            break
        time.sleep(1)
    assert [e["event"] for e in events] == ["prefect.flow-run.Completed"]


def _processes_on(host) -> list[str]:
    """The pids running in ``host``'s network namespace."""
    import subprocess

    return subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True,
                          check=True).stdout.split()


def _live_after_start(ha, analysis: str, created: dict):
    def callback(name, doc):
        if name == "start":
            def go():
                ha.delegate(analysis, "a1", doc["uid"])
                created["run"] = ha.api.create_analysis_run(analysis, "live", "a1", doc["uid"])
            threading.Thread(target=go, daemon=True).start()
    return callback


def _live_scan(ha, num: int, delay: float, seed: int):
    created: dict = {}
    thread, out = start_scan_thread(ha.topo.tiled_uri, ha.alice(), num=num, delay=delay, seed=seed,
                                    subscribers=[_live_after_start(ha, "saxs_average", created)])
    deadline = time.monotonic() + 120
    while "run" not in created and time.monotonic() < deadline:
        time.sleep(0.2)
    run = created["run"]
    uid = run["parameters"]["run_id"]
    reader = user_root(ha.topo.tiled_uri, ha.alice())
    while time.monotonic() < deadline:   # the live run has checkpointed some frames
        try:
            if reader[f"processed/a1/{uid}/saxs_average/live"].metadata["frames_processed"] >= 4:
                break
        except KeyError:
            pass
        time.sleep(0.3)
    else:
        pytest.fail(f"the live run did not start processing: {ha.api.flow_run(run['id'])['state']}")
    fr = ha.api.flow_run(run["id"])
    host = ha.topo.host_of_pid(int(str(fr["infrastructure_pid"]).rsplit(":", 1)[-1]))
    assert host is not None and host.name.startswith("w"), fr["infrastructure_pid"]
    return thread, out, run, uid, host


def _assert_live_once(ha, run: dict, uid: str, num: int) -> dict:
    done = ha.api.wait_for_flow_run(run["id"], timeout=300, interval=1.0)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    same = ha.api.flow_runs(tags=[f"run:{uid}", "analysis:saxs_average"])
    assert [r["id"] for r in same] == [run["id"]], "one flow run for this analysis of this run"
    root = user_root(ha.topo.tiled_uri, ha.alice())
    node = root[f"processed/a1/{uid}/saxs_average"]
    assert list(node) == ["live"], list(node)
    meta = node["live"].metadata
    assert meta["frames_processed"] == num and meta["status"] == "complete", meta
    raw = root[f"raw/a1/{uid}/primary/saxs"].read()
    assert raw.shape[0] == num
    np.testing.assert_allclose(node["live"]["average"].read(), raw.astype(np.float64).mean(axis=0), rtol=1e-9)
    return done


def test_worker_host_killed_mid_live_is_resumed_once(ha):
    """Every process of the live run's worker host SIGKILLed mid-scan (worker, zygote, the
    flow-run child): the heartbeat automation (visitflow/production/ha_recovery.py)
    reschedules the same flow run, the other worker resumes it from its checkpoint, and it
    completes once: frames == scan, result == numpy's float64 mean."""
    num = 30
    thread, out, run, uid, host = _live_scan(ha, num, 0.4, seed=11)
    first_pid = ha.api.flow_run(run["id"])["infrastructure_pid"]
    try:
        ha.topo.kill_host(host)
        assert "uid" not in out, "the kill must happen mid-scan"
        thread.join(120)
        assert not thread.is_alive(), "the scan did not finish"
        done = _assert_live_once(ha, run, uid, num)
        assert done["run_count"] == 2, done["run_count"]
        names = [s["name"] for s in ha.states(run["id"])]
        assert "Rescheduled" in names, names
        # Another process completed it, and not on the killed host: that host runs nothing
        # (its worker comes back only in ensure_workers below), so nothing could start there.
        assert done["infrastructure_pid"] and done["infrastructure_pid"] != first_pid, (first_pid, done)
        assert _processes_on(host) == [], "something runs on the killed host"
    finally:
        ha.ensure_workers()


def test_worker_host_network_cut_30s(ha):
    """The live run's worker host is cut off for 30 s mid-scan (its veth down), then back:
    the run ends completed — by the same process or, if rescheduled, by another worker from
    the checkpoint — and Tiled holds one live result with exactly the scan's frames."""
    num = 30
    thread, out, run, uid, host = _live_scan(ha, num, 0.4, seed=12)
    ha.topo.cut(host)
    try:
        time.sleep(30)
    finally:
        ha.topo.heal(host)
    try:
        thread.join(120)
        assert not thread.is_alive(), "the scan did not finish"
        done = _assert_live_once(ha, run, uid, num)
        assert done["run_count"] in (1, 2), done["run_count"]
    finally:
        ha.ensure_workers()


def _fence_writes(ha) -> dict[tuple[str, str], float]:
    """Tiled's count of fenced live writes, by (attempt, outcome) (visitflow/tiled/live_fence.py)."""
    import re

    text = httpx.get(f"{ha.topo.tiled_uri}/metrics", timeout=10).text
    return {(a, o): float(v) for a, o, v in
            re.findall(r'^visitflow_tiled_live_fence_total\{attempt="(\d+)",outcome="(\w+)"\} (\S+)$', text, re.M)}


def _live_fence(reader, uid: str):
    try:
        return dict(reader[f"processed/a1/{uid}/saxs_average/live"].metadata.get("fence") or {})
    except (KeyError, httpx.HTTPError):
        return {}


@pytest.mark.ops   # issue 21's ops suite includes the 90 s fencing cut (it runs on the HA topology)
def test_worker_host_network_cut_90s_is_fenced(ha):
    """The live run's worker host cut off for 90 s mid-scan — longer than the automation's
    75 s — so the run is rescheduled while its first attempt is still alive on the cut-off
    host.  Attempt 2 claims the live node (its fence) on the other worker and completes from
    the checkpoint; when the link returns, Tiled refuses attempt 1 (409) or attempt 1 sees
    from Prefect that it was superseded, and it stops through Prefect's Abort: no state
    reported (the run stays COMPLETED, never Crashed/Failed), an ERROR line in the run's logs.
    Exactly one writer after the claim: Tiled's count of attempt 1's allowed writes does not
    move once attempt 2 has claimed; result == numpy's float64 mean."""
    num = 30
    thread, out, run, uid, host = _live_scan(ha, num, 0.4, seed=13)
    old_pid = int(str(ha.api.flow_run(run["id"])["infrastructure_pid"]).rsplit(":", 1)[-1])
    reader = user_root(ha.topo.tiled_uri, ha.alice())
    assert _live_fence(reader, uid).get("attempt") == 1, _live_fence(reader, uid)
    ha.topo.cut(host)
    cut_at = time.monotonic()
    claimed_at, writes_at_claim = None, None
    try:
        while time.monotonic() < cut_at + 90:
            if claimed_at is None and _live_fence(reader, uid).get("attempt") == 2:
                claimed_at, writes_at_claim = time.monotonic() - cut_at, _fence_writes(ha)
            time.sleep(1)
    finally:
        ha.topo.heal(host)
    try:
        deadline = time.monotonic() + 180
        while claimed_at is None and time.monotonic() < deadline:    # a slow reschedule: claim after heal
            if _live_fence(reader, uid).get("attempt") == 2:
                claimed_at, writes_at_claim = time.monotonic() - cut_at, _fence_writes(ha)
            time.sleep(0.5)
        assert claimed_at is not None, f"attempt 2 never claimed the live node: {ha.states(run['id'])}"
        thread.join(120)
        assert not thread.is_alive(), "the scan did not finish"
        done = _assert_live_once(ha, run, uid, num)
        assert done["run_count"] == 2, done["run_count"]
        # The old attempt comes back and stops (its process on the cut-off host ends).
        wait_until(lambda: not Path(f"/proc/{old_pid}").exists(), 180,
                   f"attempt 1 (pid {old_pid}) stopping after the link returned")
        after = _fence_writes(ha)
        assert after.get(("1", "allowed"), 0) == writes_at_claim.get(("1", "allowed"), 0), \
            ("attempt 1 wrote after attempt 2 claimed", writes_at_claim, after)
        assert after.get(("2", "allowed"), 0) > writes_at_claim.get(("2", "allowed"), 0), after
        final = ha.api.flow_run(run["id"])
        assert final["state"]["type"] == "COMPLETED" and final["run_count"] == 2, final["state"]
        names = [s["name"] for s in ha.states(run["id"])]
        assert "Rescheduled" in names and "Crashed" not in names and "Failed" not in names, names
        logs = ha.api.request("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                             "limit": 200})
        stops = [entry["message"] for entry in logs if "attempt 1) stops" in entry["message"]]
        assert stops, [entry["message"] for entry in logs][-20:]
        from tests.ops.test_runbooks import run_runbook

        out = run_runbook("live-fence", {**ha.topo.env, "TILED": ha.topo.tiled_uri, "RUN": run["id"]})
        assert 'visitflow_tiled_live_fence_total{attempt="2",outcome="allowed"}' in out, out
        assert "attempt 1) stops" in out, out
        print(f"claimed {claimed_at:.0f} s after the cut; fenced writes {after}; {stops[0]}")
    finally:
        ha.ensure_workers()
