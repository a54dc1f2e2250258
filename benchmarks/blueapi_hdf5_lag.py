"""``python -m benchmarks.blueapi_hdf5_lag``: live lag on the HDF5 detector path through the
real blueapi 1.21.1 — frame written by the detector → a live result that includes it readable.

The plan is ``saxs_detector_scan`` (deployments/blueapi/visitflow_detector_plans.py: ophyd-async's
sim detector, SWMR HDF5, registered by blueapi's own TiledWriter) as Alice, on the stack of
tests/fixtures/blueapi_stack.py (dev IdP, Tiled with ``--file-root``, Prefect server + warm
worker); ``saxs_average`` live follows the file.

* **frame written**: the detector's own per-frame write time, read afterwards with h5py from
  the file (``TIMESTAMPS_PATH``, where areaDetector keeps ``NDArrayTimeStamp``);
* **result readable**: this process polls the live result's metadata over HTTP every
  ``--poll`` s (as Alice) and notes when ``frames_processed`` first covers the frame.  The
  poll interval bounds the error (≤ one interval late); the live engine paces its writes
  (engine ``write_pacing``), so a frame's lag includes waiting for the next write.

Frames before the live flow run was running (it starts after the start document, and its
first read catches up in bulk) are reported apart: the steady-state row is frames written
after the first live result appeared.  The first scan is a warm-up and dropped.  Writes
benchmarks/results/blueapi_hdf5_lag.md and a section of benchmarks/RESULTS.md; the load
average before and after is recorded.  Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures import blueapi_stack as bs  # noqa: E402

SECTION = "## blueapi HDF5 detector: frame written → live result readable (benchmarks/blueapi_hdf5_lag.py)"
TIMESTAMPS_PATH = "/entry/instrument/NDAttributes/NDArrayTimeStamp"   # visitflow_detector_plans.py


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


class ResultPoller(threading.Thread):
    """(wall time, frames_processed) of the newest run's live result, polled over HTTP."""

    def __init__(self, root, session: str, before: set, interval: float):
        super().__init__(daemon=True)
        self.root, self.session, self.before, self.interval = root, session, before, interval
        self.uid, self.seen, self.stop = None, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                if self.uid is None:
                    self.uid = next((u for u in self.root[self.session] if u not in self.before), None)
                else:
                    meta = self.root[f"processed/{bs.SESSION}/{self.uid}/saxs_average/live"].metadata
                    self.seen.append((time.time(), int(meta.get("frames_processed", 0))))
            except Exception:   # noqa: BLE001 - nodes appear as the scan goes
                pass
            self.stop.wait(self.interval)


def one_scan(stack, root, api, frames: int, height: int, width: int, exposure: float, poll: float):
    import h5py

    session = f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"
    poller = ResultPoller(root, session, set(root[session]), poll)
    poller.start()
    try:
        task = stack.blueapi.run(lambda: stack.token("alice"), "saxs_detector_scan",
                                 {"frames": frames, "height": height, "width": width, "exposure": exposure},
                                 timeout=900)
        assert task["errors"] == [] and task["outcome"]["outcome"] == "success", task
        uid = task["outcome"]["result"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            live = [r for r in api.flow_runs(tags=[f"run:{uid}", "variant:live"])]
            if live and api.wait_for_flow_run(live[0]["id"], timeout=600)["state"]["type"] in ("COMPLETED", "FAILED"):
                break
            time.sleep(0.5)
        time.sleep(2 * poll)
    finally:
        poller.stop.set()
        poller.join(10)
    (source,) = root[f"{session}/{uid}/primary/saxs"].data_sources()
    with h5py.File(urlparse(source.assets[0].data_uri).path, "r", swmr=True) as f:
        written = np.asarray(f[TIMESTAMPS_PATH][:], dtype=float)
    first_result = next((t for t, n in poller.seen if n > 0), None)
    steady, catch_up = [], []
    for k, t_written in enumerate(written):
        t_seen = next((t for t, n in poller.seen if n >= k + 1), None)
        if t_seen is None:
            continue
        (steady if first_result is not None and t_written >= first_result else catch_up).append(t_seen - t_written)
    return steady, catch_up, len(written)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2, help="measured scans (plus one warm-up of 10 frames)")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--size", type=int, default=1024, help="frame height = width (uint32)")
    p.add_argument("--exposure", type=float, default=0.1)
    p.add_argument("--poll", type=float, default=0.1, help="result poll interval, s")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not bs.venv_present():
        print("blueapi's venv is missing: run .ci/install-blueapi")
        return 2
    from visitflow.core.prefect_api import PrefectAPI
    from visitflow.core.tiled_client import BearerAuth, connect

    load_before = os.getloadavg()
    steady, catch_up, frames = [], [], 0
    with tempfile.TemporaryDirectory() as tmp, bs.running_stack(Path(tmp)) as stack:
        api = PrefectAPI(stack.prefect_api, timeout=30)
        root = connect(stack.tiled.uri, BearerAuth(lambda: stack.token("alice")))
        one_scan(stack, root, api, 10, args.size, args.size, args.exposure, args.poll)   # warm-up
        for _ in range(args.n):
            s, c, n = one_scan(stack, root, api, args.frames, args.size, args.size, args.exposure, args.poll)
            steady += s
            catch_up += c
            frames += n
        api.close()
    load_after = os.getloadavg()
    size = f"{args.frames}×{args.size}² uint32"
    row = (f"| HDF5 detector through blueapi, {size}, {args.n} scans | steady: n={len(steady)} frames, "
           f"p50 {pct(steady, 50):.2f}s / p95 {pct(steady, 95):.2f}s | catch-up (written before the first live "
           f"result): n={len(catch_up)}, p50 {pct(catch_up, 50):.2f}s / p95 {pct(catch_up, 95):.2f}s |")
    print(row)
    if args.no_write:
        return 0
    when = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    about = (f"{when}, {platform.machine()} · {platform.python_version()}, {os.cpu_count()} cores, load average "
             f"{' '.join(f'{v:.2f}' for v in load_before)} before, {' '.join(f'{v:.2f}' for v in load_after)} after; "
             f"real blueapi 1.21.1 (pass-through Tiled mode), ophyd-async sim detector (exposure {args.exposure}s), "
             f"dev IdP, Tiled 0.2.20 with --file-root, Prefect server + warm worker; result polled every "
             f"{args.poll}s (lag is ≤ {args.poll}s late).")
    table = f"| what | frame written → live result readable | before the live run caught up |\n|---|---|---|\n{row}\n"
    raw = f"raw steady lags (s): {[round(float(v), 2) for v in steady]}\n"
    (REPO / "benchmarks" / "results" / "blueapi_hdf5_lag.md").write_text(
        f"# HDF5 detector through blueapi: frame written → live result readable\n\n{table}\n{about}\n\n{raw}")
    results = REPO / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    head, _, rest = text.partition("\n" + SECTION)
    tail = rest[rest.find("\n## "):] if rest and "\n## " in rest else ""
    results.write_text(head.rstrip("\n") + tail + f"\n\n{SECTION}\n\n{about}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
