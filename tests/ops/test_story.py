"""The whole story on this suite's servers, every one logging JSON: a scan whose trigger
starts live and post analyses, run by the visitflow worker with its ops port.  Then:

* the worker's ``/readyz`` follows its zygote (killed here: not ready, naming it; the next
  run restarts it: ready again), and its ``/metrics`` carry start latency, running runs,
  runs finished, the heartbeat and the flow runs' own series (frames processed);
* the no-heartbeat alert evaluated on the worker's scraped heartbeat (moving: silent) and on
  a failed scrape of the frozen worker (``up`` 0: fires);
* every log line of every service and every Prefect log of the story is scanned for the
  planted client secrets and for any token string: none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.fixtures.prefect_fixtures import running_prefect
from tests.fixtures.scans import held_scan, run_scan, start_scan_thread, user_root
from tests.fixtures.waiting import wait_until
from tests.ops.conftest import SECRETS, save, scrape, total
from tests.ops.test_alert_rules import promtool_test
from tests.ops.test_runbooks import run_runbook
from visitflow.core.jsonlog import PREFECT_JSON_LOGS
from visitflow.stack.services import free_port

pytestmark = pytest.mark.ops

ANALYSES = ("saxs_average", "peak_stats")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+")


def analysis_plan(det, saxs, motor, md):
    import bluesky.plans as bp

    from visitflow.trigger.plans import uses_analyses

    @uses_analyses(*ANALYSES)
    def my_scan():
        return (yield from bp.scan([det, saxs], motor, -2, 2, 12, md=md))

    return my_scan()


@pytest.fixture(scope="module")
def ops_prefect(tmp_path_factory, ops_idp, ops_tiled, monkeypatch_module):
    ops_port = free_port()
    for key, value in PREFECT_JSON_LOGS.items():   # the server too (it inherits the environment)
        monkeypatch_module.setenv(key, value)
    with running_prefect(tmp_path_factory.mktemp("ops-prefect"), issuer=ops_idp.issuer, tiled_uri=ops_tiled.uri,
                         worker_env={"VISITFLOW_WORKER_OPS_PORT": str(ops_port), "VISITFLOW_LOG_FORMAT": "json",
                                     **PREFECT_JSON_LOGS}) as stack:
        stack.ops_url = f"http://127.0.0.1:{ops_port}"
        def ready() -> bool:
            try:
                return httpx.get(f"{stack.ops_url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, timeout=120, what="the worker's /readyz")
        except AssertionError:
            raise AssertionError(f"worker not ready; its log:\n{stack.worker.log_tail(60)}")
        yield stack


def _trigger(ops_idp, ops_prefect, state_dir: Path, token: str, **settings):
    """blueapi's trigger (the light distribution's ``AnalysisTrigger``) on this suite's servers."""
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    return AnalysisTrigger(TriggerSettings(issuer=ops_idp.issuer, prefect_api_url=ops_prefect.api_url,
                                           client_secret=SECRETS["blueapi"], state_dir=state_dir, max_backoff=1.0,
                                           **settings), token=token)


@pytest.fixture(scope="module")
def story(tmp_path_factory, ops_idp, ops_tiled, ops_prefect):
    """Run the story once; the tests below read what it left."""
    tmp = tmp_path_factory.mktemp("ops-story")
    port = free_port()
    token = ops_idp.token("alice")
    trig = _trigger(ops_idp, ops_prefect, tmp / "trigger", token, metrics_port=port)
    metrics_urls = {"token-service": f"{ops_idp.issuer}/metrics", "tiled": f"{ops_tiled.uri}/metrics",
                    "worker": f"{ops_prefect.ops_url}/metrics", "trigger": f"http://127.0.0.1:{port}/metrics"}
    before = {name: scrape(url) for name, url in metrics_urls.items()}
    try:
        uid = run_scan(ops_tiled.uri, token, plan=analysis_plan, subscribers=[trig])
        assert trig.flush(90), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
        runs = ops_prefect.api.flow_runs(tags=[f"run:{uid}"])
        assert len(runs) == 4
        done = [ops_prefect.api.wait_for_flow_run(r["id"], timeout=300) for r in runs]
        assert [d["state"]["type"] for d in done] == ["COMPLETED"] * 4, [ops_prefect.logs(r["id"]) for r in runs]
        # A run is COMPLETED in Prefect a moment before its process is reaped by the worker.
        worker_done = lambda: total(scrape(metrics_urls["worker"]), "visitflow_worker_runs_total") - \
            total(before["worker"], "visitflow_worker_runs_total") == 4
        wait_until(worker_done, timeout=60, what="the worker counted the four runs finished")
        after = {name: scrape(url) for name, url in metrics_urls.items()}
        for name, url in metrics_urls.items():
            save(f"story-{name}.txt", url)
    finally:
        trig.close()
    return {"uid": uid, "runs": done, "before": before, "after": after, "user_token": token}


def test_story_moves_every_services_counters(story):
    b, a = story["before"], story["after"]

    def moved(service, name, **labels):
        return total(a[service], name, **labels) - total(b[service], name, **labels)

    assert moved("token-service", "visitflow_token_requests_total", client="blueapi", grant="token_exchange",
                 outcome="ok") == 2                                     # one grant per analysis
    assert moved("token-service", "visitflow_token_requests_total", client="visitflow", grant="token_exchange",
                 outcome="ok") >= 4                                     # T_data per flow run
    assert moved("tiled", "visitflow_tiled_token_decisions_total", outcome="accepted") >= 5
    assert moved("tiled", "visitflow_tiled_introspection_seconds_count") >= 5
    assert moved("trigger", "visitflow_trigger_exchange_seconds_count", outcome="ok") == 2
    assert total(a["trigger"], "visitflow_trigger_outbox_depth") == 0     # everything sent
    assert moved("worker", "visitflow_worker_runs_total", outcome="ok") == 4
    assert moved("worker", "visitflow_worker_start_seconds_count", variant="live") == 2
    assert moved("worker", "visitflow_worker_start_seconds_count", variant="post") == 2
    assert total(a["worker"], "visitflow_worker_running_runs") == 0
    # the flow runs' own series, through the worker (prometheus-client multiprocess files)
    for analysis in ANALYSES:
        for variant in ("live", "post"):
            assert moved("worker", "visitflow_flow_frames_processed_total", analysis=analysis, variant=variant) == 12


def test_worker_not_ready_while_its_zygote_is_dead_and_ready_after_the_next_run(story, ops_prefect, ops_idp):
    ready = httpx.get(f"{ops_prefect.ops_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"zygote", "prefect-api"}
    import psutil

    worker = psutil.Process(ops_prefect.worker.pid)
    zygotes = [p for p in worker.children(recursive=True) if "visitflow.worker.zygote" in " ".join(p.cmdline())]
    assert zygotes, "the worker's zygote process"
    os.killpg(zygotes[0].pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{ops_prefect.ops_url}/readyz", timeout=10).status_code == 503, timeout=30,
               what="the worker not ready without its zygote")
    body = httpx.get(f"{ops_prefect.ops_url}/readyz", timeout=10).json()
    assert body["failing"] == ["zygote"] and "no run can start" in body["checks"]["zygote"]["detail"]
    # The next run restarts the zygote (VisitflowWorker._ensure_zygote).
    run = ops_prefect.run("saxs_average", "post", "a1", story["uid"], timeout=300,
                          idempotency_key=uuid.uuid4().hex)     # a new run, not the story's
    assert run["state"]["type"] == "COMPLETED"
    wait_until(lambda: httpx.get(f"{ops_prefect.ops_url}/readyz", timeout=30).status_code == 200, timeout=60,
               what=f"ready again: {httpx.get(f'{ops_prefect.ops_url}/readyz', timeout=30).text}")


def test_stuck_live_run_and_upgrade_runbooks(story, ops_prefect):
    from visitflow.stack.prefect import POOL

    env = {**ops_prefect.env, "WORKER": ops_prefect.ops_url, "POOL": POOL}
    out = run_runbook("stuck-live-run", env)
    assert out.startswith('{"status": "ready"'), out
    assert 'visitflow_worker_running_runs{variant="live"} 0.0' in out and "visitflow_worker_heartbeat" in out
    before = {d["id"]: d["updated"] for d in ops_prefect.api.request("POST", "/deployments/filter", json={})}
    assert before, "the story's deployments"
    out = run_runbook("upgrade", {**env, "VISITFLOW_REPO": str(Path(__file__).resolve().parents[2])})
    assert "True" in out, out          # paused while upgrading
    after = {d["id"]: d["updated"] for d in ops_prefect.api.request("POST", "/deployments/filter", json={})}
    assert set(after) == set(before) and all(after[n] > before[n] for n in before), (before, after)   # redeployed
    assert ops_prefect.api.request("GET", f"/work_pools/{POOL}")["is_paused"] is False   # resumed


def _held_analysis_plan(hold: threading.Event, num: int, pause_after: int):
    """``held_scan`` declaring saxs_average: the trigger starts its live run at the start
    document and its post run at the stop document."""
    from visitflow.trigger.plans import uses_analyses

    scan = held_scan(hold, pause_after=pause_after, num=num, step_sleep=0.05)

    @uses_analyses("saxs_average")
    def plan(det, saxs, motor, md):
        return (yield from scan(det, saxs, motor, md))

    return plan


def test_cancel_live_run_runbook_then_the_post_run_still_analyses_every_frame(tmp_path, ops_idp, ops_tiled,
                                                                               ops_prefect):
    """runbook:cancel-live-run on a live run mid-scan (the scan held, so it is certainly
    running): CANCELLED by Prefect through the worker; its live result keeps its checkpoint;
    the post run the stop document starts reads every frame and equals numpy."""
    token = ops_idp.token("alice")
    trig = _trigger(ops_idp, ops_prefect, tmp_path / "trigger", token)
    started: dict = {}
    hold = threading.Event()
    num, pause_after = 12, 6
    try:
        thread, out = start_scan_thread(
            ops_tiled.uri, token, plan=_held_analysis_plan(hold, num, pause_after),
            subscribers=[lambda name, doc: started.setdefault("uid", doc["uid"]) if name == "start" else None, trig])
        wait_until(lambda: "uid" in started or "error" in out, timeout=60, what="the scan's start document")
        uid = started["uid"]
        tags = [f"run:{uid}", "variant:live"]
        wait_until(lambda: any(r["state"]["type"] == "RUNNING" for r in ops_prefect.api.flow_runs(tags=tags)),
                   timeout=180, what="the live run running")
        (live,) = ops_prefect.api.flow_runs(tags=tags)
        reader = user_root(ops_tiled.uri, token)

        def checkpointed() -> int:
            try:
                return reader[f"processed/a1/{uid}/saxs_average/live"].metadata["frames_processed"]
            except KeyError:
                return 0

        wait_until(lambda: checkpointed() >= 3, timeout=180,
                   what=f"the live run's checkpoint (logs: {ops_prefect.logs(live['id'])[-1500:]})")
        assert "uid" not in out, "the scan is held: the cancel comes mid-scan"
        said = run_runbook("cancel-live-run", {**ops_prefect.env, "RUN": live["id"]})
        assert "cancellation" in said, said
        cancelled = ops_prefect.api.wait_for_flow_run(live["id"], timeout=120)
        assert cancelled["state"]["type"] == "CANCELLED", cancelled["state"]
        kept = checkpointed()
        assert pause_after >= kept >= 3, kept
        hold.set()
        thread.join(120)
        assert not thread.is_alive() and "error" not in out, out
        assert trig.flush(90), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
        (post,) = ops_prefect.api.flow_runs(tags=[f"run:{uid}", "variant:post"])
        done = ops_prefect.api.wait_for_flow_run(post["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", ops_prefect.logs(post["id"])
    finally:
        hold.set()
        trig.close()
    node = reader[f"processed/a1/{uid}/saxs_average"]
    raw = reader[f"raw/a1/{uid}/primary/saxs"].read()
    assert raw.shape[0] == num
    assert node.metadata["current"] == f"post-{post['id'][:8]}", node.metadata["current"]
    current = node[node.metadata["current"]]
    np.testing.assert_allclose(current["average"].read(), raw.astype(np.float64).mean(axis=0), rtol=1e-9)
    assert checkpointed() == kept, "nothing wrote the cancelled live result afterwards"


def test_no_heartbeat_alert_silent_on_the_moving_heartbeat_and_firing_on_the_frozen_worker(tmp_path, story,
                                                                                           ops_prefect):
    url = f"{ops_prefect.ops_url}/metrics"
    first = total(scrape(url), "visitflow_worker_heartbeat_timestamp_seconds")
    wait_until(lambda: total(scrape(url), "visitflow_worker_heartbeat_timestamp_seconds") > first, timeout=30,
               what="the heartbeat moving")
    second = total(scrape(url), "visitflow_worker_heartbeat_timestamp_seconds")
    # promtool's clock starts at 0: the scraped timestamps, shifted so the first is t=0
    labels = 'job="visitflow-worker",instance="w-1"'
    promtool_test(tmp_path, "VisitflowNoHeartbeat", {
        f"visitflow_worker_heartbeat_timestamp_seconds{{{labels}}}": [0, second - first, 60 + second - first,
                                                                      120 + second - first],
        f"up{{{labels}}}": [1, 1, 1, 1]}, [("3m", [])])
    worker = ops_prefect.worker.pid
    os.kill(worker, signal.SIGSTOP)       # frozen: no heartbeat, no scrape
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=3)
    finally:
        os.kill(worker, signal.SIGCONT)
    up = 0  # the failed scrape, as Prometheus records it
    promtool_test(tmp_path, "VisitflowNoHeartbeat", {
        f"visitflow_worker_heartbeat_timestamp_seconds{{{labels}}}": [0, 0, 0, 0],
        f"up{{{labels}}}": [1, up, up, up]}, [("3m", [{"instance": "w-1"}])])


def _log_lines(root: Path) -> list[str]:
    lines = []
    for path in root.rglob("*.log"):
        lines += path.read_text(errors="replace").splitlines()
    return lines


def test_no_secret_and_no_token_in_any_log_line_or_prefect_log(story, ops_idp, ops_tiled, ops_prefect):
    roots = {Path(ops_idp.service.log_path).parent, Path(ops_tiled.service.log_path).parent,
             Path(ops_prefect.server.log_path).parent, Path(ops_prefect.worker.log_path).parent}
    lines = [line for root in roots for line in _log_lines(root)]
    prefect_logs = []
    for run in ops_prefect.api.flow_runs(tags=[f"run:{story['uid']}"]):
        prefect_logs += ops_prefect.logs(run["id"]).splitlines()
    assert len(lines) > 50 and len(prefect_logs) > 10, (len(lines), len(prefect_logs))
    planted = [*SECRETS.values(), story["user_token"]]
    for line in lines + prefect_logs:
        assert not any(secret in line for secret in planted), f"a secret in a log line: {line[:200]}"
        assert not JWT.search(line), f"a token in a log line: {line[:200]}"
    # JSON where asked for: the IdP, Tiled and visitflow's worker lines parse, with their ids
    idp_lines = _log_lines(Path(ops_idp.service.log_path).parent)
    parsed = [json.loads(line) for line in idp_lines if line.startswith("{")]
    assert parsed and all({"ts", "level", "logger", "msg"} <= set(p) for p in parsed)
    assert any("request_id" in p for p in parsed), "the token service's lines carry request ids"
    assert any(p["logger"] == "uvicorn.access" for p in parsed), "the access log is on and JSON"
    worker_json = [json.loads(line) for line in _log_lines(Path(ops_prefect.worker.log_path).parent)
                   if line.startswith("{")]
    assert any(p.get("flow_run_id") for p in worker_json), "Prefect's JSON lines carry the flow-run id"
