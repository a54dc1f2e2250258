"""Live by push (``stream``): real Tiled with a streaming cache, real RunEngine + TiledWriter
scans, real run-bound data tokens; the engine follows the run through Tiled's websocket stream.

The flow-level proof (deployed live flow by push == post == numpy) is in
``test_flows_e2e.py::test_live_during_scan_matches_post``; here the source itself, the
fallbacks, a Tiled restart and a Redis-backed multi-process Tiled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from visitflow.stack.services import free_port, start_service
from visitflow.core.tiled_client import BearerAuth, connect, ensure_container
from visitflow.flow.sink import TiledResultSink

from tests.fixtures.ci import missing_part
from tests.fixtures.scans import held_scan
from tests.fixtures.stream_helpers import assert_answer, follow, push_source, scan_in_thread, spec_of
from tests.fixtures.tiled_fixtures import TiledHandle, running_tiled

pytestmark = pytest.mark.stream


@pytest.mark.parametrize("analysis", ["saxs_average", "peak_stats"])
def test_live_by_push_equals_numpy(idp, tiled_server, analysis):
    """Frames come from the messages' payloads (arrays and table rows), not HTTP reads."""
    spec = spec_of(analysis)
    alice = idp.token("alice")
    cap, thread, out = scan_in_thread(tiled_server.uri, alice, num=25, delay=0.1)
    _, data = idp.delegate(alice, "a1", cap.uid, analysis)
    with push_source(tiled_server.uri, data, "a1", cap.uid, spec) as source:
        outputs, sink = follow(source, spec)
        stats = source.stats()
    thread.join(60)
    assert not thread.is_alive(), "the scan did not finish"
    assert "error" not in out
    assert sink.writes[-1][1:] == (25, "complete")
    assert_answer(outputs, spec, tiled_server.uri, alice, "a1", cap.uid)
    assert stats["push_reads"] > 0 and stats["http_reads"] <= 2, stats   # HTTP at most for a catch-up at start
    # polling is only the reconciliation: far fewer HTTP looks than frames
    assert stats["http_polls"] < 25, stats


def test_one_runs_messages_never_reach_another_runs_analysis(idp, tiled_server):
    """Two scans at once in one visit, each followed with its own run-bound token: each result
    is its own run's numpy answer and each source subscribed only below its own run."""
    spec = spec_of("saxs_average")
    alice = idp.token("alice")
    runs = [scan_in_thread(tiled_server.uri, alice, num=15, delay=0.1, seed=seed) for seed in (1, 2)]
    uids = [cap.uid for cap, _, _ in runs]
    assert uids[0] != uids[1]
    results = []
    sources = [push_source(tiled_server.uri, idp.delegate(alice, "a1", uid)[1], "a1", uid, spec) for uid in uids]
    import threading

    def run(i):
        results.append((i, follow(sources[i], spec)[0]))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    assert not any(w.is_alive() for w in workers), "a live analysis did not finish"
    stats = [s.stats() for s in sources]
    for s in sources:
        s.close()
    for _, thread, _ in runs:
        thread.join(60)
        assert not thread.is_alive(), "the scan did not finish"
    assert len(results) == 2
    for i, outputs in results:
        assert_answer(outputs, spec, tiled_server.uri, alice, "a1", uids[i])
        urls = list(stats[i]["subscriptions"])
        assert urls and all(f"/raw/a1/{uids[i]}" in u for u in urls), urls
        assert not any(uids[1 - i] in u for u in urls)
        assert sum(v["messages"] for v in stats[i]["subscriptions"].values()) > 0


def test_tiled_without_streaming_cache_completes_by_polling(idp, tmp_path_factory):
    spec = spec_of("saxs_average")
    with running_tiled(idp, tmp_path_factory.mktemp("tiled-nostream"),
                       extra_args=("--streaming-cache", "none")) as tiled:
        alice = idp.token("alice")
        cap, thread, out = scan_in_thread(tiled.uri, alice, num=12, delay=0.1)
        _, data = idp.delegate(alice, "a1", cap.uid)
        with push_source(tiled.uri, data, "a1", cap.uid, spec) as source:
            outputs, sink = follow(source, spec)
            stats = source.stats()
        thread.join(60)
        assert not thread.is_alive(), "the scan did not finish"
        assert sink.writes[-1][1:] == (12, "complete")
        assert_answer(outputs, spec, tiled.uri, alice, "a1", cap.uid)
        subs = stats["subscriptions"].values()
        assert subs and all(s["disabled"] and s["messages"] == 0 for s in subs), stats
        assert stats["push_reads"] == 0 and stats["http_reads"] > 0


def _serve(idp, state, port, *extra, name="tiled"):
    argv = [sys.executable, "-m", "visitflow.cli", "tiled", "serve", "--issuer", idp.issuer,
            "--state-dir", str(state), "--port", str(port), "--log-level", "warning", *extra]
    uri = f"http://127.0.0.1:{port}"
    service = start_service(name, argv, log_dir=state.parent / f"logs-{name}-{port}", health_url=f"{uri}/api/v1/")
    service.wait_ready(timeout=120)
    return uri, service


def test_tiled_restart_mid_live_completes_exactly_once(idp, tmp_path_factory):
    """Tiled goes away while the live analysis follows a run and comes back (same port, same
    catalog, new empty streaming cache: sequence numbers restart).  The live analysis rides
    it out — subscriptions reconnect with a fresh token, HTTP looks retry — and finishes
    with every frame once: frames == scan, result == numpy, checkpoint == scan."""
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    spec = spec_of("saxs_average")
    tmp = tmp_path_factory.mktemp("tiled-restart")
    port = free_port()
    import threading

    resume = threading.Event()
    uri, service = _serve(idp, tmp / "state", port)
    try:
        ensure_visits(uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), ["a1"])
        alice = idp.token("alice")
        num, pause_at = 30, 12
        cap, thread, out = scan_in_thread(uri, alice, plan=held_scan(resume, pause_at, num, step_sleep=0.05, max_hold=600))
        _, data = idp.delegate(alice, "a1", cap.uid)
        root = connect(uri, BearerAuth(lambda: data))
        processed = ensure_container(root["processed/a1"], cap.uid, {"run_id": cap.uid})
        sink = TiledResultSink(processed, spec.name, "live", {"analysis": spec.name})
        result = {}

        def live():
            with push_source(uri, data, "a1", cap.uid, spec) as source:
                try:
                    result["outputs"] = follow(source, spec, sink=sink)[0]
                except Exception as exc:  # noqa: BLE001
                    result["error"] = exc
                result["stats"] = source.stats()

        follower = threading.Thread(target=live)
        follower.start()
        deadline = time.monotonic() + 60
        while sink.checkpoint() < pause_at and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sink.checkpoint() == pause_at, "the live analysis did not catch up before the pause"
        service.stop()
        time.sleep(1.0)
        uri2, service = _serve(idp, tmp / "state", port)
        time.sleep(2.0)   # let the live analysis notice the new server before frames flow again
        resume.set()
        thread.join(120)
        assert not thread.is_alive(), "the scan did not finish"
        follower.join(180)
        assert not follower.is_alive(), "the live analysis did not finish"
        assert "error" not in out, out
        assert "error" not in result, result
        assert_answer(result["outputs"], spec, uri, alice, "a1", cap.uid)
        assert sink.checkpoint() == num
        live_node = connect(uri, BearerAuth(lambda: alice))[f"processed/a1/{cap.uid}/{spec.name}/live"]
        assert live_node.metadata["frames_processed"] == num and live_node.metadata["status"] == "complete"
        subs = result["stats"]["subscriptions"].values()
        assert any(s["connects"] >= 2 for s in subs), result["stats"]   # it really reconnected
    finally:
        resume.set()
        service.stop()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server of our own on a free port (Debian's redis-server; .ci/install-redis)."""
    exe = shutil.which("redis-server")
    if exe is None:
        missing_part("redis-server is not installed (bash .ci/install-redis)")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=open(d / "redis.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def test_redis_streaming_cache_across_two_tiled_processes(idp, tmp_path_factory, redis_url):
    """Two Tiled processes, one catalog, one Redis: TiledWriter writes through the first, the
    live analysis subscribes through the second and still gets every append by push."""
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    spec = spec_of("peak_stats")
    tmp = tmp_path_factory.mktemp("tiled-redis")
    state = tmp / "state"
    writer_uri, writer = _serve(idp, state, free_port(), "--streaming-cache", redis_url, name="tiled-a")
    try:
        reader_uri, reader = _serve(idp, state, free_port(), "--streaming-cache", redis_url, name="tiled-b")
        try:
            ensure_visits(writer_uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), ["a1"])
            alice = idp.token("alice")
            cap, thread, out = scan_in_thread(writer_uri, alice, num=20, delay=0.1)
            _, data = idp.delegate(alice, "a1", cap.uid, "peak_stats")
            with push_source(reader_uri, data, "a1", cap.uid, spec) as source:
                outputs, sink = follow(source, spec)
                stats = source.stats()
            thread.join(60)
            assert not thread.is_alive(), "the scan did not finish"
            assert "error" not in out
            assert sink.writes[-1][1:] == (20, "complete")
            assert_answer(outputs, spec, writer_uri, alice, "a1", cap.uid)
            assert stats["push_reads"] > 0 and stats["http_reads"] <= 2, stats   # HTTP at most for a catch-up at start
        finally:
            reader.stop()
    finally:
        writer.stop()


def test_stream_url():
    from visitflow.flow.push import stream_url

    assert stream_url("http://h:1/api/v1/metadata/raw/a1/u") == "ws://h:1/api/v1/stream/single/raw/a1/u"
    assert stream_url("https://h/api/v1/metadata/raw/a1/u?x=1") == "wss://h/api/v1/stream/single/raw/a1/u"
    with pytest.raises(ValueError):
        stream_url("http://h/elsewhere")


def test_frame_cache_contiguity_and_bounds():
    import numpy as np

    from visitflow.flow.push import FrameCache

    c = FrameCache(max_bytes=10 * 8)
    c.put(0, np.arange(3.0))
    c.put(3, np.arange(3.0, 5.0))
    c.put(6, np.arange(6.0, 7.0))   # a gap at 5
    assert c.contiguous_end(0) == 5 and c.contiguous_end(6) == 7
    np.testing.assert_array_equal(c.get(1, 5), [1, 2, 3, 4])
    assert c.get(4, 7) is None
    c.put(3, np.arange(3.0, 5.0))   # a re-published append replaces, never duplicates
    assert c.nbytes == 6 * 8
    c.prune(3)
    assert c.get(0, 2) is None and c.get(3, 5) is not None
    c.put(7, np.arange(7.0, 14.0))  # over the byte bound: the oldest chunks go
    assert c.nbytes <= 10 * 8 and c.get(7, 14) is not None
