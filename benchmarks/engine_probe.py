"""Run the saxs_average engine (live or post) on one raw run in a fresh process and report
its CPU, peak RSS and wall time as JSON (used by P4 and P5, so numbers are the analysis
process's own, not the benchmark driver's).

    python benchmarks/engine_probe.py TILED_URI TOKEN RUN_UID live|live-push|post [NODE_NAME]

``live`` polls (TiledRawRun), ``live-push`` follows Tiled's websocket stream (PushRawRun);
NODE_NAME (default saxs_average) names the processed node, so several probes can follow one
run side by side.
"""

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "flows")]


def main():
    uri, token, uid, variant = sys.argv[1:5]
    name = sys.argv[5] if len(sys.argv) > 5 else "saxs_average"
    import psutil
    from saxs_average import saxs_average

    from visitflow.flow import engine
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.flow.sink import TiledResultSink, ensure_container
    from visitflow.flow.source import TiledRawRun
    from visitflow.flow.push import PushRawRun

    base = psutil.Process().memory_info().rss
    root = connect(uri, BearerAuth(lambda: token))
    src = TiledRawRun(root[f"raw/a1/{uid}"], ("saxs",))
    if variant == "live-push":
        src = PushRawRun(src, lambda: token)
    sink = TiledResultSink(ensure_container(root["processed"]["a1"], uid), name, variant.split("-")[0],
                           {"bench": True}, flow_run_id=f"{variant}-bench-{time.time_ns()}")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if variant.startswith("live"):
        engine.run_live(saxs_average.spec, src, sink, engine.LiveSettings(poll_interval=0.1, max_poll_interval=0.5,
                                                                          idle_timeout=300))
    else:
        engine.run_post(saxs_average.spec, src, sink)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so it would report the parent's peak.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    stats = src.stats() if hasattr(src, "stats") else {}
    if hasattr(src, "close"):
        src.close()
    print(json.dumps({"cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "wall_s": wall,
                      "base_mb": base / 2**20, "peak_mb": hwm_kb / 1024,
                      **({"push": {k: v for k, v in stats.items() if k != "subscriptions"}} if stats else {})}))


if __name__ == "__main__":
    main()
