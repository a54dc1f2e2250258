"""``python -m benchmarks.live_write_cost``: what one live running write costs, alone.

A dev IdP and a Tiled server only (as benchmarks/post_read.py); one small raw run written by
TiledWriter; then ``--writes`` sequential running writes of a 64×64 float64 result through
the live sink (an array PUT and the checkpoint PATCH each), as P2's engines make them, and
the same again through a fenced sink when this revision has the live fence.  Prints JSON:
per-write wall time (p50/p95), the Tiled server's CPU per write, and this client thread's
CPU per write.  Nothing else runs against the server, so the difference between two
revisions (run back to back, each with its own checkout first on ``PYTHONPATH``) is the
server's and client's own per-write work (benchmarks/results/live_lag.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _series(sink, n, server):
    import numpy as np

    value = np.random.default_rng(0).random((64, 64))
    sink.write({"average": value}, frames=1, status="running")   # creates the nodes
    walls = []
    s0, c0 = _cpu(server), time.thread_time()
    for i in range(n):
        t0 = time.perf_counter()
        sink.write({"average": value + i}, frames=i + 2, status="running")
        walls.append(time.perf_counter() - t0)
    s1, c1 = _cpu(server), time.thread_time()
    return {"writes": n, "wall_p50_s": float(np.percentile(walls, 50)), "wall_p95_s": float(np.percentile(walls, 95)),
            "server_cpu_per_write_ms": 1000 * (s1 - s0) / n, "client_cpu_per_write_ms": 1000 * (c1 - c0) / n}


def _parts(live, n, server):
    """The write's two requests apart, and a metadata GET for scale: server CPU ms each."""
    import numpy as np

    array = live["average"]
    value = np.random.default_rng(1).random((64, 64))
    calls = {"array PUT": lambda i: array.write(value + i),
             "metadata PATCH": lambda i: live.update_metadata({"frames_processed": 1000 + i}, drop_revision=True),
             "metadata GET": lambda i: live.refresh()}
    out = {}
    for name, call in calls.items():
        s0 = _cpu(server)
        t0 = time.perf_counter()
        for i in range(n):
            call(i)
        out[name] = {"server_cpu_ms": 1000 * (_cpu(server) - s0) / n, "wall_ms": 1000 * (time.perf_counter() - t0) / n}
    return out


def _cpu(proc) -> float:
    procs = [proc, *proc.children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live_write_cost", description=__doc__)
    p.add_argument("--writes", type=int, default=200)
    args = p.parse_args(argv)

    import psutil
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from tests.fixtures.idp_fixtures import start_idp
    from tests.fixtures.tiled_fixtures import running_tiled
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.flow.sink import TiledResultSink, ensure_container
    from visitflow.stack.sim import make_devices, motor_scan

    out = {"load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="vf-writecost-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        idp = start_idp(tmp / "idp")
        try:
            with running_tiled(idp, tmp / "tiled") as tiled:
                server = psutil.Process(tiled.service.pid)
                root = connect(tiled.uri, BearerAuth(lambda: idp.token("alice")))
                motor, det, saxs = make_devices((64, 64), seed=0)
                RE = RunEngine({}, context_managers=[])
                RE.subscribe(TiledWriter(root["raw"]["a1"], batch_size=1))
                (uid,) = RE(motor_scan([det, saxs], motor, 3, md={"instrument_session": "a1"}))
                run = ensure_container(root["processed"]["a1"], uid)
                sink = TiledResultSink(run, "unfenced", "live", {"bench": True}, flow_run_id="bench-unfenced")
                out["unfenced"] = _series(sink, args.writes, server)
                out["parts"] = _parts(run["unfenced"]["live"], args.writes, server)
                try:
                    from visitflow.core.fence import Fence
                except ImportError:
                    out["fenced"] = None   # this revision has no live fence
                else:
                    fenced_root = connect(tiled.uri, BearerAuth(lambda: idp.token("alice")))
                    run = ensure_container(fenced_root["processed"]["a1"], uid)
                    fence = Fence(str(uuid.uuid4()), 1)
                    sink = TiledResultSink(run, "fenced", "live", {"bench": True}, flow_run_id=fence.flow_run_id,
                                           fence=fence)
                    sink.checkpoint()   # the claim, as a live flow run makes it first
                    out["fenced"] = _series(sink, args.writes, server)
        finally:
            idp.service.stop()
    out["load_end"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
