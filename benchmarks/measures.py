"""The measuring code of P1, P2 and P7, shared by every topology a benchmark runs them on.

Why one owner: ``python -m benchmarks`` (the local stack) and ``python -m benchmarks.facility``
(Keycloak + token service + OPA + PostgreSQL) must report the same quantities by the same
definitions, or their figures cannot be put side by side.  What differs between topologies —
where Prefect and Tiled are, whose token the trigger holds, which IdP it exchanges at — comes
in as arguments (a :class:`~visitflow.core.prefect_api.PrefectAPI`, a trigger factory, a Tiled
root factory, a token source); nothing here starts a server.

P1  :func:`start_latency` (create → RUNNING, server's start_time) + :func:`trigger_overhead`
    (start document → flow run created, through the real trigger);
P2  :func:`scan` writes a real run (RunEngine + TiledWriter) and :func:`watch_live` records when
    each frame's result became readable, from Tiled's own push stream; :func:`lags` pairs them;
P7  :func:`burst`: n triggers each sent twice with one idempotency key, 4 senders at once.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

__all__ = ["pct", "ts", "deploy_probe", "start_latency", "trigger_overhead", "scan", "watch_live", "lags", "burst",
           "burst_cells"]


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def ts(s: str) -> float:
    """A Prefect/Tiled ISO timestamp as epoch seconds."""
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------ P1
def deploy_probe(api, pool: str) -> None:
    """Deployment ``probe/<pool>``: benchmarks/probe_flows.py's do-nothing flow on ``pool``
    (P1's create → running and P7's burst run it, not an analysis: they measure starting)."""
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    flow = api.request("POST", "/flows/", json={"name": "probe"})
    api.request("POST", "/deployments/", json={
        "name": pool, "flow_id": flow["id"], "entrypoint": "probe_flows.py:probe",
        "path": here, "work_pool_name": pool, "enforce_parameter_schema": False,
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": here}}]})


def start_latency(api, deployment: str, n: int) -> list[float]:
    """create flow run → RUNNING (server's start_time), seconds, ``n`` runs one after another."""
    out = []
    for _ in range(n):
        t0 = time.time()
        fr = api.create_flow_run(deployment, {}, idempotency_key=str(uuid.uuid4()))
        done = api.wait_for_flow_run(fr["id"], timeout=120, interval=0.2)
        assert done["state"]["type"] == "COMPLETED", done["state"]
        out.append(ts(done["start_time"]) - t0)
    return out


def trigger_overhead(trig, api, n: int, analysis: str = "peak_stats", visit: str = "a1") -> list[float]:
    """Start document → flow run created, through the real trigger ``trig`` (exchange at its
    issuer, grant saved as a Prefect Secret, flow run created); each run is cancelled at once.

    One trigger serves all runs, as in blueapi (one per process): its Prefect lookups
    (Secret block schema, deployment id) are warm after the first run, which is dropped.
    The caller owns ``trig`` (and closes it)."""
    out = []
    for i in range(n + 1):
        uid = str(uuid.uuid4())
        t0 = time.time()
        trig("start", {"uid": uid, "analyses": [analysis], "instrument_session": visit})
        while True:
            reqs = [r for r in trig.outbox.requests() if r.run == uid]
            if reqs and reqs[0].state != "pending":
                break
            time.sleep(0.002)
        if i:
            out.append(time.time() - t0)
        assert reqs[0].state == "done", (reqs[0], trig.decisions[-3:])
        api.request("POST", f"/flow_runs/{reqs[0].flow_run_id}/set_state",
                    json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True})
    return out


# ------------------------------------------------------------------ P2
def scan(root, num, shape, delay=0.0, subscribers=(), batch_size=1, seed=0, md=None, visit="a1"):
    """One real run into ``raw/<visit>`` of the Tiled ``root`` (RunEngine + TiledWriter, the
    simulated devices of visitflow/stack/sim.py); ``subscribers`` come after the writer, so
    they see each document once it is in Tiled.  Returns the run's uid."""
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from visitflow.stack.sim import make_devices, motor_scan

    motor, det, saxs = make_devices(shape, seed=seed)
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(TiledWriter(root["raw"][visit], batch_size=batch_size))
    for cb in subscribers:
        RE.subscribe(cb)
    (uid,) = RE(motor_scan([det, saxs], motor, num, delay=delay, md={"instrument_session": visit, **(md or {})}))
    return uid


def watch_live(state: dict, name: str, seen: dict, root: Callable, token: Callable[[], str],
               visit: str = "a1", header_auth: bool = False) -> None:
    """When each frame's result became readable: the server-side timestamp of the live node's
    metadata updates, pushed to us by Tiled's stream of the analysis node (no polling load on
    the server being measured).  Waits for ``state["uid"]``, stops at ``state["stop"]``;
    ``seen[i]`` = when frame ``i`` was counted in ``frames_processed``.

    The token goes in Tiled's first message (``{"type": "auth"}``), or with ``header_auth`` in
    the upgrade request's ``Authorization`` header, as visitflow/flow/push.py sends it: Tiled
    0.2.20's first-message path refuses a facility user's own token (a 404 on the visit; the
    header path goes through visitflow's principals, benchmarks/results/facility.md)."""
    import msgpack
    from websockets.sync.client import connect as ws_connect

    from visitflow.flow.push import stream_url

    while state["uid"] is None and not state["stop"]:
        time.sleep(0.05)
    reader = root()
    path = f"processed/{visit}/{state['uid']}/{name}"
    while not state["stop"]:
        try:
            node = reader[path]
            break
        except KeyError:
            time.sleep(0.05)
    else:
        return
    url = stream_url(node.uri) + "?envelope_format=msgpack&start=1"
    headers = {"Authorization": f"Bearer {token()}"} if header_auth else None
    with ws_connect(url, max_size=None, additional_headers=headers) as ws:
        if not header_auth:
            ws.send(json.dumps({"type": "auth", "access_token": token()}))
        while not state["stop"]:
            try:
                msg = msgpack.unpackb(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            if msg.get("type") == "container-child-metadata-updated" and msg.get("key") == "live":
                done = int((msg.get("metadata") or {}).get("frames_processed", 0))
                when = dt.datetime.fromisoformat(msg["timestamp"]).timestamp()
                for i in range(done):
                    seen.setdefault(i, when)


def lags(written: dict[int, float], got: dict[int, float]) -> tuple[list[float], list[float]]:
    """(every frame's lag, the lags of frames written after the first result): the second
    leaves out the frames that waited for the analysis to start."""
    first = min(got.values()) if got else float("inf")
    return ([got[i] - written[i] for i in written if i in got],
            [got[i] - written[i] for i in written if i in got and written[i] >= first])


# ------------------------------------------------------------------ P7
def burst(api, deployment: str, n: int, seconds: float = 2.0, senders: int = 4) -> dict:
    """``n`` trigger requests, each sent twice under one idempotency key (a retried trigger),
    by ``senders`` threads at once (several blueapi instances), for a ``seconds``-long flow.

    Returns ids (distinct flow runs), completed, duplicates (a second create that made a
    second run), starts (created → RUNNING, s), total (first create → last run final, s),
    retries (503/timeouts the senders waited out, as the trigger's outbox does)."""
    from visitflow.errors import PrefectUnavailable

    keys = [f"burst-{uuid.uuid4()}" for _ in range(n)]
    t0 = time.time()
    created = {}
    retries = [0]

    def create(key):
        while True:
            try:
                return api.create_flow_run(deployment, {"seconds": seconds}, idempotency_key=key)
            except PrefectUnavailable:
                retries[0] += 1
                time.sleep(1.0)

    def send(key):
        a, b = create(key), create(key)
        created[key] = (a["id"], b["id"], time.time())

    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, keys))
    ids = {v[0] for v in created.values()}
    dupes = sum(1 for v in created.values() if v[0] != v[1])
    finals = [api.wait_for_flow_run(i, timeout=600, interval=0.5) for i in ids]
    completed = sum(1 for f in finals if f["state"]["type"] == "COMPLETED")
    starts = [ts(f["start_time"]) - ts(f["created"]) for f in finals if f.get("start_time")]
    ends = [ts(f["end_time"]) for f in finals if f.get("end_time")]
    return {"ids": sorted(ids), "completed": completed, "duplicates": dupes, "starts_s": starts,
            "total_s": time.time() - t0, "makespan_s": (max(ends) - t0) if ends else float("nan"),
            "retries": retries[0]}


def burst_cells(n: int, r: dict) -> tuple[str, str, str, str]:
    """P7's row of the results table (the local stack's wording)."""
    return (f"P7 burst: {n} triggers (each sent twice), 20 concurrent analyses",
            f"{len(r['ids'])} flow runs, {r['completed']} completed, {r['duplicates']} duplicates",
            f"start p50 {pct(r['starts_s'], 50):.1f}s p95 {pct(r['starts_s'], 95):.1f}s",
            f"all done in {r['total_s']:.0f}s; {r['retries']} 503/timeouts retried")
