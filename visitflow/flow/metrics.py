"""A flow run's own metrics: frames processed and live lag.

A flow run lives minutes and nobody can scrape it, so its numbers are *exposed through the
worker*: the visitflow worker starts its zygote with ``PROMETHEUS_MULTIPROC_DIR`` set
(prometheus-client's multiprocess mode, made for pre-forking servers), each forked flow run
writes its values to files there, and the worker's ``/metrics``
(:mod:`visitflow.worker.ops_server`) adds them up.  Outside that worker (a stock process
worker, a test) the values stay in the process and cost nothing.

* ``visitflow_flow_frames_processed_total{analysis,variant}``
* ``visitflow_flow_live_lag_frames{analysis}`` — frames written to Tiled but not yet
  analysed by a running live run (the live-lag alert); live runs only, removed when the run ends.
* ``visitflow_flow_last_progress_timestamp_seconds{analysis}`` — when a live run last made
  progress (the no-heartbeat alert).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge

__all__ = ['FRAMES', 'LIVE_LAG', 'LAST_PROGRESS', 'observe_progress']

FRAMES = Counter("visitflow_flow_frames_processed", "Frames analysed by flow runs", ["analysis", "variant"])
LIVE_LAG = Gauge("visitflow_flow_live_lag_frames", "Frames available but not yet analysed (live runs)",
                 ["analysis"], multiprocess_mode="livemax")
LAST_PROGRESS = Gauge("visitflow_flow_last_progress_timestamp_seconds", "Last progress of a live run",
                      ["analysis"], multiprocess_mode="livemax")


def observe_progress(analysis: str, variant: str, previous: int, done: int, known: int | None) -> None:
    """Record one progress report of the engine (``done`` frames of ``known``)."""
    if done > previous:
        FRAMES.labels(analysis, variant).inc(done - previous)
    if variant == "live":
        LIVE_LAG.labels(analysis).set(max(0, (known or done) - done))
        LAST_PROGRESS.labels(analysis).set(time.time())
