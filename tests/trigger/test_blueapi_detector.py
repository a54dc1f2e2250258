"""An area detector through the real blueapi 1.21.1: ophyd-async writes the frames to an HDF5
file itself, blueapi's own TiledWriter registers that file in Tiled, and ``saxs_average``
follows it live and reads it all post.

The plan is deployments/blueapi/visitflow_detector_plans.py ``saxs_detector_scan`` (ophyd-async's
sim detector, SWMR HDF5, StreamResource/StreamDatum); the stack is tests/fixtures/blueapi_stack.py
(Tiled with ``--file-root raw=<beamline>/{instrument}/{visit}``).  The reference is computed here,
from the HDF5 file with h5py, in float64 — not by the analysis's code.

Marker ``blueapi``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import h5py
import numpy as np
import pytest

from visitflow.core.prefect_api import PrefectAPI
from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.flow.sink import read_result

from tests.fixtures import blueapi_stack as bs

pytestmark = pytest.mark.blueapi

#: The issue's frame size, 1024x1024 uint32, but 50 frames (200 MiB) rather than 100: under
#: the shared 2-core box's load 100 frames took 60-200 s here, past this suite's CI allowance.
#: benchmarks/blueapi_hdf5_lag.py runs the full 100 (400 MiB).
FRAMES, HEIGHT, WIDTH = 50, 1024, 1024
EXPOSURE = 0.1
DATASET = "/entry/data/data"


def reference_mean(path: Path) -> tuple[np.ndarray, int]:
    """float64 mean over frames of the detector's own file, read with h5py frame by frame."""
    with h5py.File(path, "r", swmr=True) as f:
        data = f[DATASET]
        total = np.zeros(data.shape[1:], dtype=np.float64)
        for i in range(data.shape[0]):
            total += data[i]
        return total / data.shape[0], int(data.shape[0])


def file_of(array_node) -> Path:
    (source,) = array_node.data_sources()
    assert source.management == "external" and source.mimetype == "application/x-hdf5", source
    return Path(urlparse(source.assets[0].data_uri).path)


def live_logs(prefect: PrefectAPI, flow_run_id: str) -> str:
    rows, offset = [], 0
    while True:
        page = prefect.request("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                             "limit": 200, "offset": offset, "sort": "TIMESTAMP_ASC"})
        rows += [r["message"] for r in page]
        if len(page) < 200:
            return "\n".join(rows)
        offset += 200


class LiveWatcher(threading.Thread):
    """Records, while the scan runs, the live result's ``frames_processed`` next to the number
    of frames Tiled says the raw file holds: evidence that live followed the file as it grew."""

    def __init__(self, stack, token: str):
        super().__init__(daemon=True)
        self.root = connect(stack.tiled.uri, BearerAuth(lambda: token))
        self.session = f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"
        self.before = set(self.root[self.session])
        self.uid = None
        self.seen: list[tuple[int, int, bool]] = []     # (frames_processed, raw frames, raw stopped)
        self.stop = threading.Event()

    def run(self):
        root = self.root
        while not self.stop.is_set():
            try:
                if self.uid is None:
                    self.uid = next((u for u in root[self.session] if u not in self.before), None)
                else:
                    raw = root[f"{self.session}/{self.uid}"]
                    stopped = raw.metadata.get("stop") is not None
                    frames = raw["primary"]["saxs"].shape[0] if "saxs" in raw.get("primary", {}) else 0
                    live = root[f"processed/{bs.SESSION}/{self.uid}/saxs_average/live"].metadata
                    self.seen.append((int(live.get("frames_processed", 0)), int(frames), stopped))
            except Exception:   # noqa: BLE001 - nodes appear as the scan goes; try again
                pass
            self.stop.wait(0.3)


def test_detector_hdf5_through_blueapi_live_follows_and_post_equals_numpy(blueapi, prefect):
    alice = blueapi.token("alice")
    watcher = LiveWatcher(blueapi, alice)
    watcher.start()
    t0 = time.monotonic()
    try:
        task = blueapi.blueapi.run(lambda: blueapi.token("alice"), "saxs_detector_scan",
                                   {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "exposure": EXPOSURE,
                                    "seed": 5}, timeout=600)
        scan_s = time.monotonic() - t0
        assert task["errors"] == [] and task["outcome"]["outcome"] == "success", task
        uid = task["outcome"]["result"]
        runs = {}
        deadline = time.monotonic() + 180
        while len(runs) < 2 and time.monotonic() < deadline:
            runs = {next(t for t in r["tags"] if t.startswith("variant:")): r
                    for r in prefect.flow_runs(tags=[f"run:{uid}", "analysis:saxs_average"])}
            time.sleep(0.5)
        assert set(runs) == {"variant:live", "variant:post"}, runs
        done = {v: prefect.wait_for_flow_run(r["id"], timeout=600) for v, r in runs.items()}
        total_s = time.monotonic() - t0
    finally:
        watcher.stop.set()
        watcher.join(10)
    for v, r in done.items():
        assert r["state"]["type"] == "COMPLETED", (v, r["state"])

    # The raw run: blueapi's TiledWriter registered the detector's own file, in Alice's visit directory.
    root = connect(blueapi.tiled.uri, BearerAuth(lambda: alice))
    raw = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}"]
    assert raw.metadata["start"]["analyses"] == ["saxs_average"]
    saxs = raw["primary"]["saxs"]
    h5 = file_of(saxs)
    assert h5.parent == blueapi.visit_dir() and h5.exists(), h5
    want, n = reference_mean(h5)
    assert n == FRAMES and tuple(saxs.shape[-2:]) == (HEIGHT, WIDTH) and saxs.shape[0] == FRAMES, saxs.shape
    assert np.dtype(saxs.dtype) == np.dtype("<u4"), saxs.dtype

    # Live and post both equal the h5py reference; the live run followed the file as it grew.
    node = root[f"processed/{bs.SESSION}/{uid}/saxs_average"]
    children = {"live": node["live"], "post": next(node[k] for k in node if k.startswith("post-"))}
    for variant, child in children.items():
        assert child.metadata["status"] == "complete" and child.metadata["frames_processed"] == FRAMES, \
            (variant, child.metadata)
        got = np.asarray(child["average"].read(), dtype=np.float64).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=variant)
    np.testing.assert_allclose(np.asarray(read_result(node)["average"]).reshape(want.shape), want, rtol=1e-9)
    assert watcher.uid == uid, (watcher.uid, uid)
    during = [(p, f) for p, f, stopped in watcher.seen if not stopped and 0 < p < FRAMES]
    assert during, f"no live result while the scan was still writing: {watcher.seen[:40]}"
    assert any(f < FRAMES for _, f in during), "the raw file never seen part-written"
    processed = [p for p, _, _ in watcher.seen]
    assert processed == sorted(processed), processed

    # Which path live took (push messages, or polling once the stream was refused: see
    # visitflow/flow/push.py); both must give the same answer, so this is reported, not asserted.
    logs = live_logs(prefect, done["variant:live"]["id"])
    stats = next((line for line in logs.splitlines() if line.startswith("live source:")), "live source: not logged")
    path = "polling fallback" if "following this node by polling" in logs or "'disabled': True" in stats else \
        "push" if "'messages': 0" not in stats and "messages" in stats else "undetermined"
    print(f"\nHDF5 detector through blueapi: {FRAMES}x{HEIGHT}x{WIDTH} uint32, scan {scan_s:.1f}s, "
          f"scan+live+post {total_s:.1f}s; live updates seen mid-scan {len(during)}; live path: {path}; {stats}")


def test_a_detector_file_outside_the_visit_directory_is_refused(blueapi, prefect):
    """The same plan told to write into another visit's directory (b21's): blueapi's TiledWriter
    asks Tiled to register it and Tiled refuses with the reason; no node points at the file."""
    alice = blueapi.token("alice")
    elsewhere = blueapi.visit_dir(bs.B21_SESSION, bs.B21_INSTRUMENT)
    before = set(elsewhere.iterdir())
    task = blueapi.blueapi.run(alice, "saxs_detector_scan",
                               {"frames": 3, "height": 64, "width": 64, "exposure": 0.01, "directory": str(elsewhere)},
                               timeout=300)
    written = set(elsewhere.iterdir()) - before
    assert len(written) == 1, written   # the detector did write there: only the registration is refused
    (h5,) = written
    print(f"\nblueapi task for a file outside the visit: errors={task['errors']} outcome={task['outcome']}")
    reason = f"outside the data directory of visit {bs.SESSION}"
    assert reason in str(task) or reason in blueapi.blueapi.log(), (task, blueapi.blueapi.log()[-3000:])
    root = connect(blueapi.tiled.uri, BearerAuth(lambda: alice))
    session = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"]
    for uid in session:
        run = session[uid]
        if "primary" in run and "saxs" in run["primary"]:
            assert file_of(run["primary"]["saxs"]) != h5, uid
    # The same refusal asked of Tiled directly, by Alice: a 403 with the reason, never a 500.
    uid = next(reversed(list(session)))
    r = blueapi.tiled.request("POST", f"register/{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}", alice, json={
        "id": "elsewhere", "structure_family": "array", "metadata": {}, "specs": [],
        "data_sources": [{"structure_family": "array", "mimetype": "application/x-hdf5", "management": "external",
                          "parameters": {"dataset": DATASET},
                          "structure": {"data_type": {"endianness": "little", "kind": "u", "itemsize": 4,
                                                      "dt_units": None},
                                        "chunks": [[3], [64], [64]], "shape": [3, 64, 64], "dims": None,
                                        "resizable": False},
                          "assets": [{"data_uri": h5.as_uri(), "is_directory": False, "parameter": "data_uris",
                                      "num": 0}]}]})
    assert r.status_code in (400, 403) and "outside the data directory" in r.text, (r.status_code, r.text[:300])
