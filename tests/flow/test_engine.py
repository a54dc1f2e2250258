"""Engine logic with in-memory runs (pure logic; the same engine is driven against real
Tiled in test_flows_e2e.py): live == post == numpy, batching, resume, timeouts."""

import sys
from pathlib import Path

import numpy as np
import pytest

from visitflow import errors
from hypothesis import given, settings
from hypothesis import strategies as st

from visitflow.flow import engine
from visitflow.errors import AnalysisDefinitionError
from visitflow.flow.builder import analysis

from tests.fixtures.memory_run import MemoryRun, MemorySink

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "flows"))
from peak_stats import peak_stats  # noqa: E402
from saxs_average import saxs_average  # noqa: E402

FAST = engine.LiveSettings(poll_interval=0, max_poll_interval=0, idle_timeout=5, max_batch=7)


def saxs_data(n, seed=0):
    return {"saxs": np.random.default_rng(seed).normal(10, 3, size=(n, 6, 5))}


def peak_data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(-2, 2, n)
    return {"motor": x, "det": 100 * np.exp(-((x - 0.3) ** 2) / 0.5) + rng.normal(0, 1, n)}


def drive_live(flow_obj, data, batches, sink=None, settings_=FAST):
    run = MemoryRun(data)
    it = iter(batches)

    def sleep(_):
        run.publish(next(it, 10**9))

    sink = sink or MemorySink()
    out = engine.run_live(flow_obj.spec, run, sink, settings_, sleep=sleep)
    return out, run, sink


def live_and_post(flow_obj, data, batches):
    """Drive live over ``batches`` and post over the finished run; assert they agree."""
    live, run, _ = drive_live(flow_obj, data, batches)
    n = len(next(iter(data.values())))
    post = engine.run_post(flow_obj.spec, MemoryRun(data, visible=n, finished=True), MemorySink())
    assert_same(live, post)
    return live, post, run


def assert_same(a, b):
    assert a and a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float), rtol=1e-9, atol=1e-9,
                                   err_msg=k)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), batches=st.lists(st.integers(1, 20), min_size=1, max_size=30), seed=st.integers(0, 99))
def test_saxs_live_equals_post_equals_numpy(n, batches, seed):
    data = saxs_data(n, seed)
    live, post, run = live_and_post(saxs_average, data, batches)
    np.testing.assert_allclose(live["average"], data["saxs"].mean(axis=0), rtol=1e-12)
    # Every frame was read exactly once, in order, in batches no larger than max_batch.
    assert [f for a, b in run.reads_log for f in range(a, b)] == list(range(n))
    assert all(b - a <= FAST.max_batch for a, b in run.reads_log)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 80), batches=st.lists(st.integers(1, 25), min_size=1, max_size=30), seed=st.integers(0, 99))
def test_peak_live_equals_post_equals_numpy(n, batches, seed):
    data = peak_data(n, seed)
    live, post, _ = live_and_post(peak_stats, data, batches)
    x, y = data["motor"], data["det"]
    w = np.clip(y, 0, None)
    if w.sum() == 0:  # no positive signal at all: centroid and width are undefined
        assert np.isnan(post["centroid"]) and np.isnan(post["fwhm"])
        return
    centroid = (w * x).sum() / w.sum()
    assert post["centroid"] == pytest.approx(centroid)
    assert post["integral"] == pytest.approx(np.trapezoid(y, x))
    assert post["fwhm"] == pytest.approx(2.3548 * np.sqrt((w * (x - centroid) ** 2).sum() / w.sum()), rel=1e-4)
    assert post["peak_position"] == x[np.argmax(y)] and post["frames"] == n


def test_peak_centroid_of_a_clean_gaussian():
    x = np.linspace(-5, 5, 2001)
    out = peak_stats.spec.compute({"motor": x, "det": np.exp(-((x - 1.0) ** 2) / (2 * 0.5 ** 2))})
    assert out["centroid"] == pytest.approx(1.0, abs=1e-6)
    assert out["fwhm"] == pytest.approx(2.3548 * 0.5, rel=1e-3)
    assert out["integral"] == pytest.approx(0.5 * np.sqrt(2 * np.pi), rel=1e-6)


def test_live_resume_from_checkpoint_counts_each_frame_once():
    data = saxs_data(40)
    run = MemoryRun(data, visible=25)
    sink = MemorySink(checkpoint_frames=17)  # a crashed attempt had processed 17 frames
    run.publish(0)

    def sleep(_):
        run.publish(5)

    out = engine.run_live(saxs_average.spec, run, sink, FAST, sleep=sleep)
    np.testing.assert_allclose(out["average"], data["saxs"].mean(axis=0))
    frames_read = [f for a, b in run.reads_log for f in range(a, b)]
    assert frames_read == list(range(40)), "replay [0,17) once, then only new frames"
    assert sink.writes[-1][1:] == (40, "complete")


def test_live_after_the_end_processes_everything_once():
    data = saxs_data(12)
    run = MemoryRun(data, visible=12, finished=True)
    sink = MemorySink()
    out = engine.run_live(saxs_average.spec, run, sink, FAST, sleep=lambda _: None)
    np.testing.assert_allclose(out["average"], data["saxs"].mean(axis=0))
    assert sink.writes[-1][1:] == (12, "complete")


def test_live_idle_timeout():
    run = MemoryRun(saxs_data(5), visible=2)
    clock = iter(range(0, 10**6, 10))
    with pytest.raises(errors.LiveIdleTimeout, match="no new frames"):
        engine.run_live(saxs_average.spec, run, MemorySink(),
                        engine.LiveSettings(poll_interval=0, idle_timeout=30), sleep=lambda _: None,
                        clock=lambda: next(clock))


def test_post_waits_then_refuses_aborted_runs():
    run = MemoryRun(saxs_data(5), visible=5, finished=True, exit_status="abort")
    with pytest.raises(errors.RunAborted, match="abort"):
        engine.run_post(saxs_average.spec, run, MemorySink())
    unfinished = MemoryRun(saxs_data(5), visible=3)
    with pytest.raises(errors.RunNotFinished):
        engine.run_post(saxs_average.spec, unfinished, MemorySink(),
                        engine.PostSettings(wait_timeout=0.05, poll_interval=0.01), sleep=lambda s: None)


def test_live_keeps_partial_result_of_aborted_run():
    run = MemoryRun(saxs_data(6), exit_status="abort")
    sink = MemorySink()
    with pytest.raises(errors.RunAborted):
        engine.run_live(saxs_average.spec, run, sink, FAST, sleep=lambda _: run.publish(4))
    assert sink.writes[-1][1:] == (6, "ended:abort")


def test_plain_form_live_is_throttled_but_final_is_exact():
    @analysis(reads=["saxs"], live_throttle=3600)
    def plain_mean(saxs):
        return {"average": saxs.mean(axis=0)}

    data = saxs_data(30)
    out, run, sink = drive_live(plain_mean, data, [3] * 10)
    np.testing.assert_allclose(out["average"], data["saxs"].mean(axis=0))
    assert len(sink.writes) <= 3, "throttled: first batch, final drain, complete"


@pytest.mark.parametrize("make,match", [
    (lambda: analysis(reads="saxs"), "non-empty list"),
    (lambda: analysis(reads=[]), "non-empty list"),
    (lambda: analysis(reads=["a b"]), "not a valid field"),
    (lambda: analysis(reads=["x", "x"]), "twice"),
    (lambda: analysis(reads=["saxs"], name="t")(lambda detector: {}), "missing \\['saxs'\\]"),
    (lambda: analysis(reads=["saxs"], name="t")(lambda saxs, other: {}), "unexpected required \\['other'\\]"),
    (lambda: analysis(reads=["saxs"], name="t", incremental=object())(lambda saxs: {}), "takes a class"),
    (lambda: analysis(reads=["saxs"], name="t", incremental=type("NoUpdate", (), {"result": lambda s: {}}))(lambda saxs: {}),
     "no update"),
    (lambda: analysis(reads=["saxs"], name="t", incremental=type("Bad", (), {"update": lambda s, det: None,
                                                                   "result": lambda s: {}}))(lambda saxs: {}),
     "Bad.update must take"),
])
def test_definition_errors_are_clear(make, match):
    with pytest.raises(AnalysisDefinitionError, match=match):
        make()


def test_bad_outputs_are_reported():
    @analysis(reads=["saxs"])
    def returns_list(saxs):
        return [1]

    with pytest.raises(AnalysisDefinitionError, match="dict of outputs"):
        returns_list.spec.compute({"saxs": np.zeros((1, 2))})


def _slow_writes_live(pacing, pace_above=0.0, write_time=1.0):
    """30 frames published one per 0.1 s (fake clock); every sink write takes ``write_time`` s."""
    data = saxs_data(30)
    run = MemoryRun(data)
    now = [0.0]

    class SlowSink(MemorySink):
        def write(self, outputs, *, frames, status):
            now[0] += write_time
            super().write(outputs, frames=frames, status=status)

    def sleep(dt):
        now[0] += max(dt, 0.1)
        run.publish(1)

    settings_ = engine.LiveSettings(poll_interval=0.1, max_poll_interval=0.1, idle_timeout=60, max_batch=7,
                                    write_pacing=pacing, pace_above=pace_above)
    sink = SlowSink()
    out = engine.run_live(saxs_average.spec, run, sink, settings_, sleep=sleep, clock=lambda: now[0])
    return data, out, sink


def test_live_writes_are_paced_by_their_cost_and_the_result_is_unchanged():
    data, paced, paced_sink = _slow_writes_live(1.0)
    _, unpaced, unpaced_sink = _slow_writes_live(0.0)
    for out in (paced, unpaced):
        np.testing.assert_allclose(out["average"], data["saxs"].mean(axis=0), rtol=1e-12)
    running = [w for w in paced_sink.writes if w[2] == "running"]
    unpaced_running = [w for w in unpaced_sink.writes if w[2] == "running"]
    assert paced_sink.writes[-1][1:] == (30, "complete") == unpaced_sink.writes[-1][1:]
    # Unpaced: a write per frame (each arrives while the previous write "took" 1 s, so more
    # frames pile up: still one write per poll).  Paced: a write at most every 2 s.
    assert len(unpaced_running) == 30 and len(running) <= len(unpaced_running) // 5
    frames = [w[1] for w in running]
    assert frames == sorted(frames) and len(set(frames)) == len(frames), "checkpoints only move forward"
    gaps = np.diff([w[1] for w in running])
    assert (gaps >= 1).all()


def test_quick_writes_are_never_paced():
    """Writes within ``pace_above`` follow each batch at once (a frame's lag is its one write):
    as many running writes as unpaced, each covering every frame seen so far."""
    data, out, sink = _slow_writes_live(1.0, pace_above=0.5, write_time=0.3)
    _, _, unpaced_sink = _slow_writes_live(0.0, write_time=0.3)
    np.testing.assert_allclose(out["average"], data["saxs"].mean(axis=0), rtol=1e-12)
    running = [w[1] for w in sink.writes if w[2] == "running"]
    assert running == [w[1] for w in unpaced_sink.writes if w[2] == "running"]
    assert sink.writes[-1][1:] == (30, "complete")


def test_only_the_time_a_write_takes_beyond_pace_above_is_paced():
    """1 s writes: with pace_above 2 s never paced (as unpaced); with 0.5 s, the next waits
    the excess (0.5 s): fewer writes than unpaced, more than pacing by the whole write."""
    unpaced = [w for w in _slow_writes_live(0.0)[2].writes if w[2] == "running"]
    never = [w for w in _slow_writes_live(1.0, pace_above=2.0)[2].writes if w[2] == "running"]
    excess = [w for w in _slow_writes_live(1.0, pace_above=0.5)[2].writes if w[2] == "running"]
    whole = [w for w in _slow_writes_live(1.0, pace_above=0.0)[2].writes if w[2] == "running"]
    assert [w[1] for w in never] == [w[1] for w in unpaced]
    assert len(whole) < len(excess) < len(unpaced)
