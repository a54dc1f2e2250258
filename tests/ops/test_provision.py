"""``visitflow provision`` (docs/operations.md's runbook:provision, run by bash as written)
on a real Tiled, a real Prefect server and a real OPA that polls the written bundle over
HTTP (OPA's bundle plug-in, a plain http.server in front of the bundle directory — what a
facility's nginx or object store would be).

* first run: every item created; Tiled's visit containers carry their access tags (set by the
  server's policy), Prefect has each visit's live limit, OPA decides by the bundle;
* second run: nothing changes (``0 created … N unchanged``, the bundle byte-identical);
* a session removed (another added, one resized): its limit and its OPA entry go after OPA's
  next poll, its Tiled containers stay.

Also here: the live-lag alert on a real lag (a live analysis stalled 250 frames behind),
scraped from the worker's own ops server the way the worker exposes flow runs' metrics.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.fixtures.idp_fixtures import SECRETS
from tests.fixtures.opa_fixtures import require_opa
from tests.fixtures.prefect_fixtures import running_prefect
from tests.fixtures.tiled_fixtures import start_tiled
from tests.fixtures.waiting import wait_until
from tests.ops.conftest import scrape, total
from tests.ops.test_alert_rules import promtool_test
from tests.ops.test_runbooks import run_runbook
from visitflow.production.provision import LIMIT_PREFIX
from visitflow.stack.services import free_port, start_service

pytestmark = pytest.mark.ops

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deployments" / "opa" / "data.json"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory):
    """The bundle directory over HTTP (OPA's ``services`` point here)."""
    root = tmp_path_factory.mktemp("bundles")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, ops_idp, bundle_server):
    """A fresh Tiled (no visit containers yet) and a bare Prefect server (limits need no
    deployments), started side by side: the two slowest start-ups of this module."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        tiled_future = pool.submit(start_tiled, ops_idp, tmp_path_factory.mktemp("prov-tiled"))
        try:
            with running_prefect(tmp_path_factory.mktemp("prov-prefect"), issuer=ops_idp.issuer, tiled_uri="",
                                 with_worker=False, configured=False) as prefect:
                yield tiled_future.result(), prefect
        finally:
            if tiled_future.exception() is None:    # waits for it: Tiled is never left running
                tiled_future.result().service.stop()


def start_polling_opa(tmp: Path, bundle_url: str):
    """OPA with nothing but the bundle (policy and data, as deployments/kubernetes' OPA), polled every 1-2 s."""
    port = free_port()
    conf = ["--set", f"services.useroffice.url={bundle_url}",
            "--set", "bundles.facility.service=useroffice", "--set", "bundles.facility.resource=bundle.tar.gz",
            "--set", "bundles.facility.polling.min_delay_seconds=1",
            "--set", "bundles.facility.polling.max_delay_seconds=2"]
    service = start_service("opa-bundle", [require_opa(), "run", "--server", "--addr", f"127.0.0.1:{port}",
                                           "--log-level", "error", *conf],
                            log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/health?bundles")
    service.wait_ready(timeout=60)
    return service, f"http://127.0.0.1:{port}"


def decide(opa: str, user: str, visit: str) -> dict:
    r = httpx.post(f"{opa}/v1/data/visitflow/authz/decision", timeout=10,
                   json={"input": {"subject": {"fedid": user}, "action": "read", "store": "raw", "visit": visit}})
    r.raise_for_status()
    return r.json()["result"]


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory, ops_idp, servers, bundle_server):
    tiled, prefect = servers
    root, url = bundle_server
    env = {"SESSIONS": SHIPPED, "TILED": tiled.uri, "ISSUER": ops_idp.issuer, "PREFECT_API_URL": prefect.api_url,
           "BUNDLE": root / "bundle.tar.gz", "VISITFLOW_ADMIN_SECRET": SECRETS["visitflow-admin"]}
    first = run_runbook("provision", {**env, "OPA": "http://127.0.0.1:9"})   # OPA not started yet
    opa, opa_url = start_polling_opa(tmp_path_factory.mktemp("prov-opa"), url)
    yield {"env": {**env, "OPA": opa_url}, "first": first, "opa": opa_url, "tiled": tiled, "prefect": prefect}
    opa.stop()


def tags(tiled, token: str, path: str):
    r = tiled.get(f"metadata/{path}", token)
    return r.json()["data"]["attributes"]["access_tags"] if r.status_code == 200 else r.status_code


def live_limits(prefect) -> dict[str, int]:
    page = prefect.api.request("POST", "/v2/concurrency_limits/filter", json={"limit": 200})
    return {item["name"]: item["limit"] for item in page if item["name"].startswith(LIMIT_PREFIX)}


def test_provision_creates_tagged_containers_limits_and_the_bundle_and_a_second_run_changes_nothing(
        provisioned, ops_idp):
    tiled, prefect, first = provisioned["tiled"], provisioned["prefect"], provisioned["first"]
    assert "2 session(s), valid" in first
    assert "tiled:raw/a1: created" in first and "limit:visitflow-live-a2: created (4)" in first
    assert first.splitlines()[-2] == "13 created, 0 updated, 0 removed, 0 unchanged", first
    admin = ops_idp.client_token("visitflow-admin")
    assert {p: tags(tiled, admin, p) for p in ("raw/a1", "processed/a1", "raw/a2", "processed/a2")} == {
        "raw/a1": ["visitflow:raw:a1"], "processed/a1": ["visitflow:processed:a1"],
        "raw/a2": ["visitflow:raw:a2"], "processed/a2": ["visitflow:processed:a2"]}
    assert live_limits(prefect) == {"visitflow-live-a1": 4, "visitflow-live-a2": 4}
    assert decide(provisioned["opa"], "bob", "a2")["allow"], "OPA decides by the served bundle"

    bundle = Path(provisioned["env"]["BUNDLE"]).read_bytes()
    second = run_runbook("provision", provisioned["env"])
    assert second.splitlines()[-2] == "0 created, 0 updated, 0 removed, 13 unchanged", second
    assert second.splitlines()[-1] == "opa bundles 200"
    assert Path(provisioned["env"]["BUNDLE"]).read_bytes() == bundle
    assert live_limits(prefect) == {"visitflow-live-a1": 4, "visitflow-live-a2": 4}


def test_a_removed_session_loses_its_limit_and_opa_entry_after_the_next_poll_and_keeps_its_data(
        provisioned, ops_idp, tmp_path):
    tiled, prefect, opa = provisioned["tiled"], provisioned["prefect"], provisioned["opa"]
    doc = json.loads(SHIPPED.read_text())
    doc["facility"]["sessions"]["a3"] = {**doc["facility"]["sessions"].pop("a2"), "live_limit": 2}
    doc["facility"]["sessions"]["a1"]["live_limit"] = 3        # a1 resized: its limit and OPA entry updated
    sessions = tmp_path / "sessions.json"
    sessions.write_text(json.dumps(doc, indent=2))
    out = run_runbook("provision", {**provisioned["env"], "SESSIONS": sessions})
    assert "opa:a2: removed" in out and "limit:visitflow-live-a2: removed" in out, out
    assert "limit:visitflow-live-a1: updated (3)" in out and "opa:a1: updated" in out, out
    assert out.splitlines()[-2] == "4 created, 2 updated, 2 removed, 7 unchanged", out
    assert live_limits(prefect) == {"visitflow-live-a1": 3, "visitflow-live-a3": 2}
    admin = ops_idp.client_token("visitflow-admin")
    assert tags(tiled, admin, "raw/a2") == ["visitflow:raw:a2"], "the ended session's data stays"
    assert tags(tiled, admin, "processed/a3") == ["visitflow:processed:a3"]
    wait_until(lambda: "session a2 does not exist" in decide(opa, "bob", "a2")["reason"], timeout=60,
               what="OPA's next bundle poll dropping session a2")
    assert decide(opa, "bob", "a3")["allow"] and decide(opa, "alice", "a1")["allow"]


STALLED_RUN = r"""
import sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "flows")
from saxs_average import saxs_average
from visitflow.flow import engine, metrics
from visitflow.flow.testing import MemoryRun, MemorySink

release, frames, counted = Path(sys.argv[1]), 250, [0]

def progress(done, known, message):
    metrics.observe_progress("saxs_average", "live", counted[0], done, known)
    counted[0] = max(counted[0], done)
    while done == 0 and not release.exists():   # the analysis is stalled before its first batch
        time.sleep(0.1)

run = MemoryRun({"saxs": np.random.default_rng(0).normal(10, 3, size=(frames, 6, 5))}, visible=frames, finished=True)
engine.run_live(saxs_average.spec, run, MemorySink(),
                engine.LiveSettings(poll_interval=0, max_poll_interval=0, idle_timeout=5, max_batch=50),
                progress=progress, sleep=lambda _: None)
print("caught up", counted[0])
"""


def test_live_lag_alert_fires_on_a_stalled_live_analysis_scraped_from_the_workers_ops_port(tmp_path):
    """A live run 250 frames behind (its analysis stalled; the run's frames in memory —
    emulated source, the engine and metrics real), in a child process writing to the worker's
    multiprocess metrics directory, scraped from the worker's ops server.  The scraped lag is
    repeated a minute apart as Prometheus would store a lag that stays (emulated: the test
    does not stall for the alert's minute)."""
    from visitflow.worker.ops_server import WorkerOps

    port = free_port()
    ops = WorkerOps(port, zygote_alive=lambda: True, prefect_api_url=None)
    url = f"http://127.0.0.1:{port}/metrics"
    release = tmp_path / "release"
    child = subprocess.Popen([sys.executable, "-c", STALLED_RUN, str(release)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": ops.multiproc_dir})
    try:
        wait_until(lambda: total(scrape(url), "visitflow_flow_live_lag_frames", analysis="saxs_average") > 0,
                   timeout=120, what="the stalled live run's lag on the worker's /metrics")
        stalled = total(scrape(url), "visitflow_flow_live_lag_frames", analysis="saxs_average")
        release.touch()
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0 and "caught up 250" in out, out
        caught_up = total(scrape(url), "visitflow_flow_live_lag_frames", analysis="saxs_average")
        ops.finished("live", "completed", child.pid)
        gone = "visitflow_flow_live_lag_frames" in "".join(scrape(url))
    finally:
        if child.poll() is None:
            child.kill()
        ops.close()
    assert stalled == 250 and caught_up == 0 and not gone
    series = {'visitflow_flow_live_lag_frames{analysis="saxs_average",job="visitflow-worker",instance="w-1"}':
              [stalled, stalled, stalled, caught_up, caught_up]}
    promtool_test(tmp_path, "VisitflowLiveLag", series,
                  [("0m", []), ("1m", [{"analysis": "saxs_average"}]), ("2m", [{"analysis": "saxs_average"}]),
                   ("3m", [])])
