"""``python -m benchmarks.ha``: P7 and P1 on Prefect's HA topology vs a single server, one run.

P7  100 triggers, 20 concurrent 2-s probe flows (the pool's concurrency limit is 20):
    makespan (first create → last end) against the ideal 100·2/20 = 10 s, and p50/p95 of
    create → running (the server's start_time).
P1  create → flow body running (server start_time − client create time) for a do-nothing
    flow, idle and while two live analyses (saxs_average following two real scans) are busy.

"single" = one ``prefect server start`` (API + services in one process) on its own database
of the same PostgreSQL cluster, with one warm worker; "HA" = visitflow/production/
ha_topology.py (two API servers behind nginx, services apart, two warm workers on netns
hosts).  Both use the same Tiled + token service (the HA data host).  Writes
benchmarks/RESULTS-ha.md.  Needs root (see deployments/ha/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visitflow.core import names as grants, oauth  # noqa: E402
from visitflow.core.prefect_api import PrefectAPI
from visitflow.errors import PrefectUnavailable
from visitflow.production.ha_recovery import PROBE_DEPLOYMENT, deploy_probe  # noqa: E402
from visitflow.production.ha_topology import PREFIX, HATopology, _sh  # noqa: E402
from visitflow.core.scopes import grant_scopes  # noqa: E402
from visitflow.stack.services import free_port  # noqa: E402
from visitflow.stack import prefect as pstack  # noqa: E402


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def log(msg):
    print(f"[bench-ha] {msg}", flush=True)


def p7(api: PrefectAPI, n: int = 100, seconds: float = 2.0) -> dict:
    keys = [f"probe/post/a1/{uuid.uuid4()}" for _ in range(n)]
    t0 = time.time()

    def create(key):
        while True:
            try:
                return api.create_flow_run(PROBE_DEPLOYMENT, {"seconds": seconds}, idempotency_key=key)["id"]
            except PrefectUnavailable:
                time.sleep(0.5)

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(create, keys))
    finals = [api.wait_for_flow_run(i, timeout=900, interval=1.0) for i in ids]
    done = sum(f["state"]["type"] == "COMPLETED" for f in finals)
    starts = [ts(f["start_time"]) - ts(f["created"]) for f in finals if f.get("start_time")]
    end = max(ts(f["end_time"]) for f in finals if f.get("end_time"))
    waits, forks = [], []   # created → first Pending (waiting for a slot + pick-up), Pending → Running
    for f in finals:
        first = {}
        for st in sorted(api.request("GET", "/flow_run_states/", params={"flow_run_id": f["id"]}),
                         key=lambda x: x["timestamp"]):
            first.setdefault(st["type"], ts(st["timestamp"]))
        if "PENDING" in first and "RUNNING" in first:
            waits.append(first["PENDING"] - ts(f["created"]))
            forks.append(first["RUNNING"] - first["PENDING"])
    return {"to_pending_p50": pct(waits, 50), "to_pending_p95": pct(waits, 95), "pending_to_running_p50": pct(forks, 50),
            "pending_to_running_p95": pct(forks, 95), "run_seconds_p50": pct(
                [ts(f["end_time"]) - ts(f["start_time"]) for f in finals if f.get("end_time") and f.get("start_time")], 50),
            "completed": done, "makespan": end - t0, "ideal": n * seconds / 20, "start_p50": pct(starts, 50),
            "start_p95": pct(starts, 95)}


BREAKDOWN: dict[str, list[tuple[float, float]]] = {}


def p1(api: PrefectAPI, n: int = 10, label: str = "") -> list[float]:
    """create → RUNNING; BREAKDOWN[label] gets (created → Pending, Pending → Running) from the
    run's state history: the worker's pick-up and submission vs the fork and the child's start."""
    out = []
    for _ in range(n):
        t0 = time.time()
        fr = api.create_flow_run(PROBE_DEPLOYMENT, {}, idempotency_key=str(uuid.uuid4()))
        done = api.wait_for_flow_run(fr["id"], timeout=120, interval=0.1)
        assert done["state"]["type"] == "COMPLETED", done["state"]
        out.append(ts(done["start_time"]) - t0)
        states = api.request("GET", "/flow_run_states/", params={"flow_run_id": fr["id"]})
        first = {}
        for st in sorted(states, key=lambda x: x["timestamp"]):
            first.setdefault(st["type"], ts(st["timestamp"]))
        BREAKDOWN.setdefault(label, []).append((first["PENDING"] - t0, first["RUNNING"] - first["PENDING"]))
    return out


def _split(label: str) -> str:
    rows = BREAKDOWN.get(label, [])
    return (f"pick-up+submit p50 {pct([a for a, _ in rows], 50):.2f}s, fork+child start p50 "
            f"{pct([b for _, b in rows], 50):.2f}s")


class LiveLoad:
    """Two live saxs_average analyses following two real scans (RunEngine + TiledWriter)."""

    def __init__(self, topo: HATopology, api: PrefectAPI, frames: int = 60, delay: float = 0.1):
        self.topo, self.api, self.frames, self.delay = topo, api, frames, delay
        self.runs: list[str] = []
        self.threads: list[threading.Thread] = []

    def _alice(self):
        return oauth.password_login(f"{self.topo.issuer}/token", "alice", "alice").access_token

    def _scan(self, seed):
        from bluesky import RunEngine
        from bluesky_tiled_plugins import TiledWriter

        from visitflow.stack.sim import make_devices, motor_scan
        from visitflow.core.tiled_client import BearerAuth, connect

        tok = self._alice()
        root = connect(self.topo.tiled_uri, BearerAuth(lambda: tok))
        motor, det, saxs = make_devices((32, 32), seed=seed)
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(TiledWriter(root["raw"]["a1"], batch_size=1))

        def on_start(name, doc):
            if name == "start":
                grant = oauth.exchange(f"{self.topo.issuer}/token", self._alice(), client_id="blueapi",
                                       client_secret="blueapi-dev-secret", audience="visitflow",
                                       scope=str(grant_scopes("saxs_average", "a1", doc["uid"]))).access_token
                self.api.save_secret(grants.grant_secret_name("saxs_average", "a1", doc["uid"]), grant)
                self.runs.append(self.api.create_analysis_run("saxs_average", "live", "a1", doc["uid"])["id"])
        RE.subscribe(on_start)
        RE(motor_scan([det, saxs], motor, self.frames, delay=self.delay, md={"instrument_session": "a1"}))

    def __enter__(self):
        for seed in (1, 2):
            t = threading.Thread(target=self._scan, args=(seed,), daemon=True)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both live runs RUNNING
            if len(self.runs) == 2 and all(self.api.flow_run(r)["state"]["type"] == "RUNNING" for r in self.runs):
                return self
            time.sleep(0.5)
        raise RuntimeError("the two live analyses did not start")

    def still_busy(self) -> bool:
        return all(self.api.flow_run(r)["state"]["type"] == "RUNNING" for r in self.runs)

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(300)
        for r in self.runs:
            self.api.wait_for_flow_run(r, timeout=300)


def single_server(topo: HATopology, state: Path):
    """One all-in-one Prefect server on database ``prefect_single`` + one warm worker."""
    url = topo.database_url.rsplit("/", 1)[0]
    _sh("psql", "-q", url.replace("postgresql+asyncpg://", "postgresql://") + "/postgres", "-c",
        "CREATE DATABASE prefect_single")
    port = free_port()
    server = pstack.start_server(state, port, ui=False, database_url=url + "/prefect_single")
    server.wait_ready(180)
    env = pstack.prefect_env(f"http://127.0.0.1:{port}/api", state / "prefect")
    pstack.configure(env, issuer=topo.issuer, tiled_uri=topo.tiled_uri)
    pstack.run_cli(["work-pool", "set-concurrency-limit", pstack.POOL, "20"], env)
    api = PrefectAPI(env["PREFECT_API_URL"], timeout=30)
    deploy_probe(api)
    worker = pstack.start_worker(state, env, health_port=free_port(), client_secret="visitflow-dev-secret")
    worker.wait_ready(120)
    return server, worker, api


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ha", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS-ha.md"))
    args = p.parse_args(argv)
    t_all = time.monotonic()
    load0 = os.getloadavg()[0]
    topo = HATopology(Path("/tmp/placeholder"))
    topo.state = Path(f"/tmp/{PREFIX}-{topo.tag}")
    rows = []
    server = worker = None
    try:
        topo.up(pool_limit=20)
        ha_api = PrefectAPI(topo.api_url, timeout=30)
        server, worker, single_api = single_server(topo, topo.state / "single")
        log(f"both up in {time.monotonic() - t_all:.0f}s")
        res = {}
        for name, api in (("single", single_api), ("HA", ha_api)):
            p1(api, 2)  # warm-up (first run imports the flow in the zygote's child)
            res[name, "p1_idle"] = p1(api, label=f"{name} idle")
            log(f"{name} P1 idle p50 {pct(res[name, 'p1_idle'], 50):.2f}s")
            with LiveLoad(topo, api) as load:
                res[name, "p1_busy"] = p1(api, label=f"{name} busy")
                busy_ok = load.still_busy()
            log(f"{name} P1 busy p95 {pct(res[name, 'p1_busy'], 95):.2f}s (live still running: {busy_ok})")
            res[name, "p7"] = p7(api)
            log(f"{name} P7 {res[name, 'p7']}")
        for name in ("single", "HA"):
            r7 = res[name, "p7"]
            rows.append((f"P7 {name}: 100 triggers, 20 × 2 s", f"makespan {r7['makespan']:.1f}s (ideal {r7['ideal']:.0f}s, "
                         f"{r7['makespan'] / r7['ideal']:.1f}× ideal; target ≤ 2×)",
                         f"start p50 {r7['start_p50']:.1f}s p95 {r7['start_p95']:.1f}s", f"{r7['completed']}/100 completed; created→Pending p50 {r7['to_pending_p50']:.1f}s "
                         f"p95 {r7['to_pending_p95']:.1f}s, Pending→Running p50 {r7['pending_to_running_p50']:.1f}s "
                         f"p95 {r7['pending_to_running_p95']:.1f}s, Running→end p50 {r7['run_seconds_p50']:.1f}s"))
        for name in ("single", "HA"):
            idle, busy = res[name, "p1_idle"], res[name, "p1_busy"]
            rows.append((f"P1 {name}: create → flow body running", f"idle p50 {pct(idle, 50):.2f}s p95 {pct(idle, 95):.2f}s "
                         "(target p50 ≤ 0.5 s)", f"2 live busy p50 {pct(busy, 50):.2f}s p95 {pct(busy, 95):.2f}s "
                         "(target p95 ≤ 1 s)", f"busy/idle p50 ×{pct(busy, 50) / pct(idle, 50):.1f}; idle: {_split(name + ' idle')}; "
                         f"busy: {_split(name + ' busy')}"))
    finally:
        for svc in (worker, server):
            if svc is not None:
                svc.stop()
        topo.down()
        shutil.rmtree(topo.state, ignore_errors=True)
    lines = ["| measure | a | b | c |", "|---|---|---|---|", *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(["# visitflow benchmarks: HA topology vs single server", "",
                      f"{stamp} · {os.cpu_count()} cores · load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
                      f"(the machine is shared: absolute seconds inflate with load) · run took "
                      f"{time.monotonic() - t_all:.0f}s", "",
                      "Reproduce (root): `python -m benchmarks.ha`", "", *lines, ""])
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
