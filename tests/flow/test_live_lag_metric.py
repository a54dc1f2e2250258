"""The live lag a flow run reports (visitflow.flow.metrics via the engine's progress): the
frames available but not yet analysed, before each batch, and zero once caught up (pure
logic, in-memory run; the real worker's /metrics: tests/ops/test_story.py)."""

import sys
from pathlib import Path

import numpy as np

from visitflow.flow import engine, metrics

from tests.fixtures.memory_run import MemoryRun, MemorySink

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "flows"))
from saxs_average import saxs_average  # noqa: E402

FAST = engine.LiveSettings(poll_interval=0, max_poll_interval=0, idle_timeout=5, max_batch=7)


def test_live_run_reports_how_far_behind_it_is_and_counts_each_frame_once():
    data = {"saxs": np.random.default_rng(0).normal(10, 3, size=(150, 6, 5))}
    run = MemoryRun(data, visible=150, finished=True)      # started late: the whole scan is there
    reports, counted = [], [0]

    def progress(done, known, message):
        metrics.observe_progress("saxs_average_test", "live", counted[0], done, known)
        counted[0] = max(counted[0], done)
        reports.append((done, known, message, metrics.LIVE_LAG.labels("saxs_average_test")._value.get()))

    engine.run_live(saxs_average.spec, run, MemorySink(), FAST, progress=progress, sleep=lambda _: None)
    assert reports[0] == (0, 150, "live", 150.0), "behind by the whole scan before the first batch"
    assert reports[1][3] == 0.0 and reports[-1][:3] == (150, 150, "complete")
    assert metrics.FRAMES.labels("saxs_average_test", "live")._value.get() == 150
