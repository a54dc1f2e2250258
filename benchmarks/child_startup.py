"""``python -m benchmarks.child_startup``: where a forked flow run's start-up goes, per phase.

Two warm (``visitflow``) workers on one Prefect server (SQLite), each on its own pool with
the probe flow (benchmarks/probe_flows.py): ``cold-zygote`` with ``VISITFLOW_ZYGOTE_WARM=0``
(the zygote imports only its PRELOAD, as before issue 22) and ``warm-zygote`` with the
default (the zygote also warms what every child re-did; visitflow/worker/zygote.py).  Flow
runs alternate between the two, so both see the same machine load.  Every child records its
phases (visitflow/worker/phases.py) and the probe its Running hook and body start; printed
per phase: p50 wall and p50 child CPU, plus create → Running (the server's start_time).

    python -m benchmarks.child_startup [--runs 10] [--burst 0]

``--burst N`` then also starts N runs at once on each pool in turn (busy children), and
reports the server's and the worker's CPU per run over each burst's window.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visitflow.core.prefect_api import PrefectAPI  # noqa: E402
from visitflow.errors import PrefectUnavailable  # noqa: E402
from visitflow.stack import prefect as pstack  # noqa: E402
from visitflow.stack.services import free_port  # noqa: E402

POOLS = {"cold-zygote": "0", "warm-zygote": "1"}
#: (label, from mark, to mark); ``request`` is taken in the zygote just before fork
PHASES = (("fork → env set", "request", "env"), ("control channel", "env", "control"),
          ("load_flow_run", "control", "load_flow_run"),
          ("load_flow (deployment, pull step, entrypoint)", "load_flow_run", "load_flow"),
          ("run_flow → Running set", "load_flow", "running"), ("Running → body", "running", "body"),
          ("fork → body (total)", "request", "body"))


def p50(values):
    return statistics.median(values) if values else float("nan")


def records(path: Path) -> dict[int, dict[str, tuple[float, float]]]:
    """pid → mark → (wall, cpu)."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        marks = out.setdefault(rec["pid"], {})
        for name, wall, cpu, *_ in rec.get("marks", []) + ([rec["mark"]] if "mark" in rec else []):
            marks[name] = (wall, cpu)
    return out


def cpu_of(server, workers) -> dict[str, float]:
    """CPU seconds so far of the server (and its children), and of each worker process itself
    (its reaped children -- the zygote and, through it, the flow runs -- are counted apart)."""
    import psutil

    def own(pid, children=False):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)

    out = {"server": own(server.pid, True) + sum(own(c.pid) for c in psutil.Process(server.pid).children(True))}
    for pool, w in zip(POOLS, workers):
        out[pool] = own(w.pid)
    return out


def start_seconds(fr: dict) -> float:
    def ts(s):
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    return ts(fr["start_time"]) - ts(fr["created"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.child_startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="sequential runs per pool (alternating)")
    p.add_argument("--burst", type=int, default=0, help="then N concurrent runs per pool")
    args = p.parse_args(argv)
    load0 = open("/proc/loadavg").read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="vf-startup-") as tmp:
        tmp = Path(tmp)
        phases_file = tmp / "phases.jsonl"
        port = free_port()
        server = pstack.start_server(tmp, port, ui=False)
        workers = []
        try:
            server.wait_ready(300)
            env = pstack.prefect_env(f"http://127.0.0.1:{port}/api", tmp / "prefect")
            api = PrefectAPI(env["PREFECT_API_URL"], None, timeout=30)
            for pool, warm in POOLS.items():
                pstack.run_cli(["work-pool", "create", pool, "--type", "visitflow", "--overwrite"], env)
                flow = api.request("POST", "/flows/", json={"name": "probe"})
                api.request("POST", "/deployments/", json={
                    "name": pool, "flow_id": flow["id"], "entrypoint": "probe_flows.py:probe",
                    "path": str(REPO / "benchmarks"), "work_pool_name": pool, "enforce_parameter_schema": False,
                    "pull_steps": [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": str(REPO / "benchmarks")}}]})
                w = pstack.start_worker(tmp, env, health_port=free_port(), name=pool, client_secret="unused",
                                        worker_type="visitflow", pool=pool,
                                        extra_env={"VISITFLOW_CHILD_PHASES": str(phases_file),
                                                   "VISITFLOW_ZYGOTE_WARM": warm})
                workers.append(w)
            for w in workers:
                w.wait_ready(300)
            pid_pool: dict[int, str] = {}
            starts: dict[str, list[float]] = {pool: [] for pool in POOLS}

            def one(pool: str, interval: float = 0.1) -> None:
                key = str(uuid.uuid4())
                while True:   # as P7 and the trigger do: retry while the (SQLite) server sheds load
                    try:
                        fr = api.create_flow_run(f"probe/{pool}", {}, idempotency_key=key)
                        break
                    except PrefectUnavailable:
                        time.sleep(1.0)
                done = api.wait_for_flow_run(fr["id"], timeout=300, interval=interval)
                assert done["state"]["type"] == "COMPLETED", done["state"]
                pid_pool[int(str(done["infrastructure_pid"]).split(":")[-1])] = pool
                starts[pool].append(start_seconds(done))

            for pool in POOLS:   # one unmeasured run each: the first fork touches cold pages
                one(pool)
            pid_pool.clear()
            starts = {pool: [] for pool in POOLS}
            phases_file.unlink(missing_ok=True)
            cpu0 = cpu_of(server, workers)
            for _ in range(args.runs):
                for pool in POOLS:
                    one(pool)
            cpu1 = cpu_of(server, workers)
            idle = (records(phases_file), dict(pid_pool), {k: list(v) for k, v in starts.items()})
            busy = None
            if args.burst:
                phases_file.unlink(missing_ok=True)
                pid_pool.clear()
                starts = {pool: [] for pool in POOLS}
                burst_cpu = {}
                for pool in POOLS:
                    c0 = cpu_of(server, workers)
                    with ThreadPoolExecutor(args.burst) as ex:
                        list(ex.map(lambda _: one(pool, 0.5), range(args.burst)))
                    c1 = cpu_of(server, workers)
                    burst_cpu[pool] = {k: (c1[k] - c0[k]) / args.burst for k in ("server", pool)}
                busy = (records(phases_file), dict(pid_pool), starts)
        finally:
            for w in workers:
                w.stop()
            server.stop()
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"# child start-up, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
          f"load average {' '.join(load0)} → {' '.join(load1)}\n")
    for title, data in (("idle (one run at a time)", idle), (f"busy ({args.burst} at once)", busy)):
        if data is None:
            continue
        recs, pools, starts = data
        print(f"## {title}, p50 over {min(len(v) for v in starts.values())} runs per pool\n")
        print("| phase | " + " | ".join(f"{pool} wall | {pool} CPU" for pool in POOLS) + " |")
        print("|---|" + "---|---|" * len(POOLS))
        for label, a, b in PHASES:
            cells = []
            for pool in POOLS:
                ms = [m for pid, m in recs.items() if pools.get(pid) == pool and a in m and b in m]
                cells.append(f"{p50([m[b][0] - m[a][0] for m in ms]):.3f} s")
                cells.append(f"{p50([m[b][1] - m[a][1] for m in ms]):.3f} s")
            print(f"| {label} | " + " | ".join(cells) + " |")
        cells = []
        for pool in POOLS:
            ms = [m for pid, m in recs.items() if pools.get(pid) == pool and "drained" in m]
            cells += ["", f"{p50([m['drained'][1] for m in ms]):.3f} s"]
        print("| child CPU, fork → exit | " + " | ".join(cells) + " |")
        print("| create → Running (server) | " + " | ".join(f"{p50(starts[pool]):.3f} s | " for pool in POOLS) + "\n")
        if title.startswith("busy"):
            print("Per flow run in the burst (its window only; the benchmark polls each run every 0.5 s, as P7 "
                  "does): " + "; ".join(f"{pool}: server CPU {c['server']:.3f} s, worker process {c[pool]:.3f} s"
                                        for pool, c in burst_cpu.items()) + ".\n")
        if title.startswith("idle"):
            n = args.runs
            print(f"Per flow run, mean over the {2 * n} idle runs: Prefect server CPU "
                  f"{(cpu1['server'] - cpu0['server']) / (2 * n):.3f} s (both pools); worker process CPU "
                  + ", ".join(f"{pool} {(cpu1[pool] - cpu0[pool]) / n:.3f} s" for pool in POOLS) + ".\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
