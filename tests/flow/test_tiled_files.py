"""Detectors that write their own files (HDF5), registered by TiledWriter, confined per visit.

A Tiled server started with ``--file-root raw=<tmp>/beamline/{visit}``.  The documents are
what an ophyd-async detector emits — a ``StreamResource`` naming its HDF5 file and a
``StreamDatum`` per frame — fed to the real ``TiledWriter``; the file is written with h5py.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky_tiled_plugins import TiledWriter
from event_model import compose_run

from tests.fixtures.scans import user_root
from tests.fixtures.tiled_fixtures import VISITS, running_tiled
from visitflow.flow import engine
from visitflow.core.tiled_client import BearerAuth, processed_client, raw_client
from visitflow.tiled.file_roots import FileRoots, asset_uris, file_path
from visitflow.errors import FileRootError
from visitflow.flow.sink import TiledResultSink, read_result
from visitflow.flow.source import TiledRawRun
from visitflow.core.layout import Layout

SHAPE = (8, 6)


# ------------------------------------------------------------------ pure logic
LAYOUT = Layout.from_templates()


def test_file_path_normalises_and_rejects_other_schemes():
    assert file_path("file:///data/a1/../a2/x.h5") == "/data/a2/x.h5"
    assert file_path("file://localhost/data/a1/x.h5") == "/data/a1/x.h5"
    assert file_path("file:///data/a1/x%2e%2e/y.h5") == "/data/a1/x../y.h5"
    for bad in ("s3://bucket/a1/x.h5", "file://otherhost/data/a1/x.h5", "http://x/data/a1", "/data/a1/x.h5", ""):
        assert file_path(bad) is None, bad


@pytest.mark.parametrize("uri,ok", [
    ("file:///data/a1/det.h5", True),
    ("file://localhost/data/a1/sub/dir/det.h5", True),
    ("file:///data/a2/det.h5", False),                 # another visit
    ("file:///data/a1/../a2/det.h5", False),           # traversal, collapsed
    ("file:///data/a1", False),                        # the directory itself, not a file in it
    ("file:///data/a10/det.h5", False),                # a prefix of the name is not the visit
    ("file:///etc/passwd", False),
    ("s3://bucket/data/a1/det.h5", False),
])
def test_refusal_confines_files_to_the_visit_directory(uri, ok):
    roots = FileRoots({"raw": "/data/{visit}"}, LAYOUT)
    reason = roots.refusal(("raw", "a1", "run1", "primary", "saxs"), [uri])
    assert (reason is None) is ok, reason
    if not ok:
        assert reason


def test_refusal_outside_runs_and_in_stores_without_a_root():
    roots = FileRoots({"raw": "/data/{visit}"}, LAYOUT)
    assert "inside a run" in roots.refusal(("raw", "a1"), ["file:///data/a1/x.h5"])
    assert "processed" in roots.refusal(("processed", "a1", "r", "x"), ["file:///data/a1/x.h5"])
    assert roots.refusal(("raw", "a1", "r"), []) is None


def test_other_placeholders_match_one_directory_or_the_node_path():
    layout = Layout.from_templates("{instrument}/{proposal}/{visit}/{run}", None)
    roots = FileRoots({"raw": "/dls/{instrument}/data/{year}/{visit}"}, layout)
    node = ("i22", "cm1234", "a1", "run1")
    assert roots.refusal(node, ["file:///dls/i22/data/2026/a1/x.h5"]) is None
    assert roots.refusal(node, ["file:///dls/i11/data/2026/a1/x.h5"])          # other instrument
    assert roots.refusal(node, ["file:///dls/i22/data/2026/extra/a1/x.h5"])    # {year} is one segment
    assert roots.readable_storage() == ["/dls"]


@pytest.mark.parametrize("roots", [{"raw": "data/{visit}"}, {"raw": "/data/x"}, {"raw": "/data/../{visit}"},
                                   {"bogus": "/data/{visit}"}])
def test_bad_root_templates_are_refused(roots):
    with pytest.raises(FileRootError):
        FileRoots(roots, LAYOUT)


def test_asset_uris_of_register_and_data_source_bodies():
    assert asset_uris({"data_sources": [{"assets": [{"data_uri": "file:///a"}, {"data_uri": "file:///b"}]}]}) == \
        ["file:///a", "file:///b"]
    assert asset_uris({"data_source": {"assets": [{"data_uri": "file:///c"}]}}) == ["file:///c"]
    assert asset_uris({"data_sources": [{"assets": {"data_uri": "file:///a"}}]}) == ["<malformed assets>"]
    assert asset_uris({"data_sources": []}) == [] and asset_uris([1]) == []


# ------------------------------------------------------------------ real servers
@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    return tmp_path_factory.mktemp("beamline")


@pytest.fixture(scope="module")
def files_tiled(idp, tmp_path_factory, beamline):
    with running_tiled(idp, tmp_path_factory.mktemp("tiled-files"),
                       extra_args=("--file-root", f"raw={beamline}/{{visit}}")) as handle:
        for visit in VISITS:
            (beamline / visit).mkdir()
        yield handle


def detector_docs(h5: Path, frames: np.ndarray, visit: str = "a1", uri: str | None = None, swmr: bool = False):
    """The documents of a 1-point-per-frame scan whose detector writes ``h5`` itself.

    ``swmr``: keep the file open in single-writer/multiple-reader mode and flush each frame,
    as ophyd-async's HDF5 writer does; otherwise reopen and close the file per frame."""
    run = compose_run(metadata={"plan_name": "count", "instrument_session": visit})
    yield "start", run.start_doc
    n, h, w = frames.shape
    desc = run.compose_descriptor(name="primary", data_keys={
        "saxs": {"source": "sim:det", "dtype": "array", "dtype_numpy": frames.dtype.str, "shape": [h, w],
                 "external": "STREAM:"},
        "motor": {"source": "sim:motor", "dtype": "number", "dtype_numpy": "<f8", "shape": []}})
    yield "descriptor", desc.descriptor_doc
    res = run.compose_stream_resource(mimetype="application/x-hdf5", uri=uri or h5.as_uri(), data_key="saxs",
                                      parameters={"dataset": "/entry/data", "chunk_shape": [1, h, w]})
    yield "stream_resource", res.stream_resource_doc
    f = h5py.File(h5, "w", libver="latest")
    f.create_dataset("/entry/data", shape=(0, h, w), maxshape=(None, h, w), dtype=frames.dtype, chunks=(1, h, w))
    if swmr:
        f.swmr_mode = True
    else:
        f.close()
    try:
        for i in range(n):
            if not swmr:
                f = h5py.File(h5, "a")
            ds = f["/entry/data"]
            ds.resize(i + 1, axis=0)
            ds[i] = frames[i]
            if swmr:
                ds.flush()
            else:
                f.close()
            yield "stream_datum", res.compose_stream_datum(indices={"start": i, "stop": i + 1},
                                                           seq_nums={"start": i + 1, "stop": i + 2},
                                                           descriptor=desc.descriptor_doc)
            yield "event", desc.compose_event(data={"motor": float(i)}, timestamps={"motor": 0.0}, seq_num=i + 1)
    finally:
        if swmr:
            f.close()
    yield "stop", run.compose_stop(exit_status="success")


def write_run(tiled, token, docs, visit="a1") -> str:
    writer = TiledWriter(user_root(tiled.uri, token)["raw"][visit], batch_size=1)
    uid = None
    for name, doc in docs:
        if name == "start":
            uid = doc["uid"]
        writer(name, doc)
    return uid


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(3).integers(0, 4000, size=(12, *SHAPE)).astype("<u2")


@pytest.fixture(scope="module")
def file_run(files_tiled, idp, beamline, frames):
    h5 = beamline / "a1" / "saxs_000.h5"
    return write_run(files_tiled, idp.token("alice"), detector_docs(h5, frames))


def test_alice_registers_her_visits_detector_file_and_reads_it(files_tiled, idp, file_run, frames):
    run = raw_client(files_tiled.uri, BearerAuth(lambda: idp.token("alice")), visit="a1", run=file_run)
    saxs = run["primary"]["saxs"]
    assert saxs.shape == frames.shape
    np.testing.assert_array_equal(saxs.read(), frames)
    np.testing.assert_array_equal(saxs[3:5], frames[3:5])
    (source,) = saxs.data_sources()
    assert source.management == "external" and source.assets[0].data_uri.endswith("/a1/saxs_000.h5")


def test_delegated_token_analyses_the_file_live_and_post(files_tiled, idp, file_run, frames):
    """The flow's path, minus Prefect: the run-scoped T_data reads the registered file."""
    from flows.saxs_average import saxs_average

    _grant, data = idp.delegate(idp.token("alice"), "a1", file_run)
    auth = BearerAuth(lambda: data)
    source = TiledRawRun(raw_client(files_tiled.uri, auth, visit="a1", run=file_run), saxs_average.spec.reads)
    container = processed_client(files_tiled.uri, auth, visit="a1", run=file_run)
    live = engine.run_live(saxs_average.spec, source,
                           TiledResultSink(container, "saxs_average", "live", {"flow": "saxs-average"}))
    post = engine.run_post(saxs_average.spec, source,
                           TiledResultSink(container, "saxs_average", "post", {"flow": "saxs-average"},
                                           flow_run_id="feedbeef00"))
    want = frames.astype(float).mean(axis=0)
    np.testing.assert_allclose(live["average"], want, rtol=1e-9)
    np.testing.assert_allclose(post["average"], want, rtol=1e-9)
    node = user_root(files_tiled.uri, idp.token("alice"))[f"processed/a1/{file_run}/saxs_average"]
    assert node.metadata["current"] == "post-feedbeef"
    np.testing.assert_allclose(read_result(node)["average"], want, rtol=1e-9)


def test_registering_another_visits_file_is_refused_with_the_reason(files_tiled, idp, beamline, frames, file_run):
    theirs = beamline / "a2" / "secret.h5"
    with h5py.File(theirs, "w") as f:
        f["/entry/data"] = frames
    h5 = beamline / "a1" / "decoy.h5"
    with pytest.raises(Exception) as err:
        write_run(files_tiled, idp.token("alice"), detector_docs(h5, frames, uri=theirs.as_uri()))
    assert "outside the data directory of visit a1" in str(err.value)
    # nothing readable came of it: no node points at a2's file
    alice = user_root(files_tiled.uri, idp.token("alice"))
    uris = {}
    for uid in alice["raw/a1"]:
        stream = alice[f"raw/a1/{uid}"]
        if "primary" in stream and "saxs" in stream["primary"]:
            uris[uid] = stream["primary"]["saxs"].data_sources()[0].assets[0].data_uri
    assert file_run in uris, f"the check saw no registered file (not even {file_run}'s): {uris}"
    assert not [u for u in uris.values() if "/a2/" in u], uris


def register_body(key: str, uri: str) -> dict:
    return {"id": key, "structure_family": "array", "metadata": {}, "specs": [],
            "data_sources": [{"structure_family": "array", "mimetype": "application/x-hdf5",
                              "management": "external", "parameters": {"dataset": "/entry/data"},
                              "structure": {"data_type": {"endianness": "little", "kind": "u", "itemsize": 2,
                                                          "dt_units": None},
                                            "chunks": [[12], [SHAPE[0]], [SHAPE[1]]],
                                            "shape": [12, *SHAPE], "dims": None, "resizable": False},
                              "assets": [{"data_uri": uri, "is_directory": False, "parameter": "data_uris",
                                          "num": 0}]}]}


def test_register_matrix_over_http(files_tiled, idp, beamline, file_run, frames):
    """Each refusal is a 401/403 with a reason, never a 500, never a node."""
    alice, bob = idp.token("alice"), idp.token("bob")
    _grant, data = idp.delegate(alice, "a1", file_run)
    mine = (beamline / "a1" / "saxs_000.h5").as_uri()
    other = (beamline / "a2" / "secret.h5").as_uri()
    target = f"register/raw/a1/{file_run}/primary"
    cases = [
        ("alice, a2's file", alice, target, register_body("x1", other), 403, "outside the data directory"),
        ("alice, traversal", alice, target,
         register_body("x2", f"{(beamline / 'a1').as_uri()}/../a2/secret.h5"), 403, "outside the data directory"),
        ("alice, s3", alice, target, register_body("x3", "s3://bucket/a1/x.h5"), 403, "only file://"),
        ("alice, a file as a run", alice, "register/raw/a1", register_body("x4", mine), 403, "register"),
        ("alice, processed", alice, f"register/processed/a1/{file_run}", register_body("x5", mine), 403,
         "registers no external files in the processed store"),
        ("bob, a1's run", bob, target, register_body("x6", mine), (403, 404), ""),   # a1 is invisible to him
        ("T_data (read raw only)", data, target, register_body("x7", mine), 403, ""),
        ("no token", None, target, register_body("x8", mine), 401, ""),
        ("garbage token", "not.a.jwt", target, register_body("x9", mine), 401, ""),
    ]
    for label, token, path, body, status, reason in cases:
        r = files_tiled.request("POST", path, token, content=json.dumps(body),
                                headers={"content-type": "application/json"})
        assert r.status_code in (status if isinstance(status, tuple) else (status,)), \
            (label, r.status_code, r.text[:300])
        assert reason in r.text, (label, r.text[:300])
    r = files_tiled.request("POST", target, alice, content=b"\x00not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 403), r.text[:300]   # FastAPI refuses it first (400); never a 500
    listing = user_root(files_tiled.uri, alice)[f"raw/a1/{file_run}/primary"]
    assert not {"x1", "x2", "x3", "x6", "x7", "x8", "x9"} & set(listing)
    # her own file into her closed run: refused too, since raw runs are frozen at their stop
    # document (issue 20: append-only raw data) -- the refusal says so
    r = files_tiled.request("POST", target, alice, content=json.dumps(register_body("mine", mine)),
                            headers={"content-type": "application/json"})
    assert r.status_code == 403 and "append-only" in r.text, r.text[:300]
    # the positive control: the same registration into her own run while it is still open
    open_docs = [(name, doc) for name, doc in detector_docs(beamline / "a1" / "saxs_open.h5", frames)
                 if name != "stop"]
    open_run = write_run(files_tiled, alice, open_docs)
    r = files_tiled.request("POST", f"register/raw/a1/{open_run}/primary", alice,
                            content=json.dumps(register_body("mine", mine)), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    opened = user_root(files_tiled.uri, alice)[f"raw/a1/{open_run}/primary"]
    np.testing.assert_array_equal(opened["mine"][0], opened["saxs"][0])


def test_data_source_update_cannot_swap_in_another_visits_file(files_tiled, idp, beamline, file_run):
    alice = idp.token("alice")
    node = user_root(files_tiled.uri, alice)[f"raw/a1/{file_run}/primary/saxs"]
    (source,) = node.data_sources()
    from dataclasses import asdict

    body = asdict(source)
    body["assets"][0]["data_uri"] = (beamline / "a2" / "secret.h5").as_uri()
    r = files_tiled.request("PUT", f"data_source/raw/a1/{file_run}/primary/saxs", alice,
                            content=json.dumps({"data_source": body}, default=str),
                            headers={"content-type": "application/json"})
    assert r.status_code == 403 and "outside the data directory of visit a1" in r.text, r.text[:300]
    assert node.refresh().data_sources()[0].assets[0].data_uri.endswith("/a1/saxs_000.h5")


def test_default_server_registers_nothing(tiled_server, idp, beamline):
    """Without --file-root nobody gets the register scope (the shared session server)."""
    r = tiled_server.request("POST", "register/raw/a1", idp.token("alice"),
                             content=json.dumps(register_body("x", (beamline / "a1" / "saxs_000.h5").as_uri())),
                             headers={"content-type": "application/json"})
    # Tiled answers a missing Tiled scope with 401 "Not enough permissions ... register".
    assert r.status_code in (401, 403) and "register" in r.text, r.text[:300]


def test_live_follows_a_detector_file_as_it_grows(files_tiled, idp, beamline):
    """Live analysis while the detector is still appending to its HDF5 file (kept open in
    SWMR mode, as ophyd-async does)."""
    import threading
    import time

    from flows.saxs_average import saxs_average

    frames = np.random.default_rng(11).integers(0, 4000, size=(20, *SHAPE)).astype("<u2")
    alice = idp.token("alice")
    docs = detector_docs(beamline / "a1" / "growing.h5", frames, swmr=True)
    name, start = next(docs)
    writer = TiledWriter(user_root(files_tiled.uri, alice)["raw"]["a1"], batch_size=1)
    writer(name, start)
    uid = start["uid"]
    for name, doc in docs:          # descriptor and stream resource: the run exists, no frames yet
        writer(name, doc)
        if name == "stream_resource":
            break

    def rest():
        for name, doc in docs:
            writer(name, doc)
            if name == "event":
                time.sleep(0.15)

    _grant, data = idp.delegate(alice, "a1", uid)
    auth = BearerAuth(lambda: data)
    source = TiledRawRun(raw_client(files_tiled.uri, auth, visit="a1", run=uid), saxs_average.spec.reads)
    sink = TiledResultSink(processed_client(files_tiled.uri, auth, visit="a1", run=uid), "saxs_average", "live",
                           {"flow": "saxs-average"})
    seen = []
    real_write = sink.write
    sink.write = lambda outputs, *, frames, status: (seen.append(frames), real_write(outputs, frames=frames,
                                                                                     status=status))
    thread = threading.Thread(target=rest, daemon=True)
    thread.start()
    out = engine.run_live(saxs_average.spec, source, sink,
                          engine.LiveSettings(poll_interval=0.1, max_poll_interval=0.3, idle_timeout=60))
    thread.join(30)
    assert not thread.is_alive(), "the writer did not finish"
    np.testing.assert_allclose(out["average"], frames.astype(float).mean(axis=0), rtol=1e-9)
    assert seen[-1] == 20 and len(set(seen)) > 2, seen   # it wrote results while the file grew
    assert seen == sorted(seen)
