"""Run the saxs_average engine (live or post) on one raw run in a fresh process and report
its CPU, peak RSS and wall time as JSON (used by P4 and P5, so numbers are the analysis
process's own, not the benchmark driver's).

    python benchmarks/engine_probe.py TILED_URI TOKEN RUN_UID live|live-push|post [NODE_NAME]

``live`` polls (TiledRawRun), ``live-push`` follows Tiled's websocket stream (PushRawRun);
NODE_NAME (default saxs_average) names the processed node, so several probes can follow one
run side by side.

``VISITFLOW_PROBE_TIMELINE=<dir>``: also write ``<dir>/<NODE_NAME>-<run uid[:8]>.jsonl``, one line per event
of the live engine (wall clock, ``time.time()``, comparable with the benchmark's and Tiled's
timestamps on this machine): each pushed frame message as it arrives (``msg``, its first frame
and count), each ``status`` call (frames seen, duration), each ``read`` and each ``write``
(start, end, frames) -- frame appended → push received → batch computed → write sent → write
acknowledged (benchmarks/results/live_lag.md).
"""

import json
import os
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
    timeline = os.environ.get("VISITFLOW_PROBE_TIMELINE")
    events: list[dict] = []
    if timeline and variant.startswith("live"):
        src, sink = _timed(src, sink, events)
        _time_requests(root.context.http_client, events)
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
    if timeline and events:
        with open(Path(timeline) / f"{name}-{uid[:8]}.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    print(json.dumps({"cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "wall_s": wall,
                      "base_mb": base / 2**20, "peak_mb": hwm_kb / 1024,
                      **({"push": {k: v for k, v in stats.items() if k != "subscriptions"}} if stats else {})}))


class _Timed:
    """A source or sink that records its calls' wall-clock start and end in ``events``."""

    def __init__(self, inner, events, methods):
        self._inner, self._events, self._methods = inner, events, methods

    def __getattr__(self, attr):
        value = getattr(self._inner, attr)
        if attr not in self._methods:
            return value

        def timed(*args, **kwargs):
            t0 = time.time()
            out = value(*args, **kwargs)
            e = {"e": attr, "t0": t0, "t1": time.time()}
            if attr == "status":
                e["frames"], e["finished"] = out.frames, out.finished
            elif attr == "read":
                e["start"], e["stop"] = args
            elif attr == "write":
                e["frames"], e["status"] = kwargs["frames"], kwargs["status"]
            elif attr == "wait_for_change":
                e["timeout"], e["changed"] = args[0], out
            self._events.append(e)
            return out

        return timed


def _time_requests(client, events):
    """Each HTTP request of the engine's client: method, path, start, response headers in."""
    def sent(request):
        request.extensions["probe_t0"] = time.time()

    def answered(response):
        request = response.request
        events.append({"e": "http", "method": request.method, "path": request.url.path,
                       "t0": request.extensions.get("probe_t0"), "t1": time.time(), "code": response.status_code})

    client.event_hooks["request"].append(sent)
    client.event_hooks["response"].append(answered)


def _timed(src, sink, events):
    on_feed = getattr(src, "_on_feed", None)
    if on_feed is not None:  # push: when each frame message arrives (before the engine sees it)
        def recorded(sub, message):
            if message.get("type") == "array-data":
                offset = (message.get("offset") or [0])[0]
                events.append({"e": "msg", "t": time.time(), "start": int(offset),
                               "n": int((message.get("shape") or [0])[0]), "ts": message.get("timestamp")})
            return on_feed(sub, message)

        src._on_feed = recorded
    return (_Timed(src, events, {"status", "read", "wait_for_change"}), _Timed(sink, events, {"write"}))


if __name__ == "__main__":
    main()
