"""How an analysis is driven: ``post`` (everything at once) and ``live`` (poll, feed new
frames, checkpoint), over two small protocols so the logic is testable without servers and
runs unchanged against Tiled (:mod:`visitflow.flow.source`, :mod:`visitflow.flow.sink`).

Live guarantees:
- Only frames present in *every* ``reads`` field are processed (fields are written at
  slightly different moments); frames are fed in bounded batches, so with an incremental
  analysis memory stays flat however long the scan.
- After each batch the outputs are written, *then* the checkpoint (frames done) — at once
  while writes are quick, paced only when a write was slow (``LiveSettings.write_pacing``,
  ``pace_above``): after a write slower than ``pace_above`` the next waits, frames are fed
  meanwhile, so on an overloaded server several batches share one write (the checkpoint
  then lags the state, and a restart replays a little more).  Batches that arrive during a
  write always share the next one.  A
  restarted live run replays frames ``[0, checkpoint)`` into a fresh state and continues, so
  no frame is lost or counted twice, even if the crash came between outputs and checkpoint.
- It finishes after the stop document plus a final drain; it fails after ``idle_timeout``
  seconds without new frames or a stop document (a run that never ends).
- A source may offer ``blocks(start, stop, size)`` (the reads of ``read`` in blocks, the
  next one fetched while this one is fed): replay and catch-up then overlap reads and compute.
- A source that is told of changes (push, :mod:`visitflow.flow.push`) offers
  ``wait_for_change(timeout)``: the idle wait then ends as soon as something arrives, and
  the poll interval (with its backoff) is only the fallback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import EmptyRun, LiveIdleTimeout, RunAborted, RunError, RunNotFinished
from ..core.outputs import check_outputs

if TYPE_CHECKING:  # annotations only: the engine is a leaf (no import of spec or flowrun)
    from .spec import AnalysisSpec

__all__ = [
    'RawStatus', 'RawSource', 'ResultSink', 'LiveSettings', 'PostSettings', 'wait_for_stop',
    'run_post', 'run_live',
]

log = logging.getLogger("visitflow.engine")


def _empty(spec: "AnalysisSpec", status: "RawStatus") -> EmptyRun:
    return EmptyRun(f"raw run finished ({status.exit_status}) with no frames in {list(spec.reads)}: "
                    f"nothing for {spec.name} to analyse")


@dataclass(frozen=True)
class RawStatus:
    frames: int                 # frames present in every read field
    finished: bool              # stop document written
    exit_status: str | None = None


class RawSource(Protocol):
    def status(self) -> RawStatus: ...
    def read(self, start: int, stop: int) -> dict[str, Any]: ...


class ResultSink(Protocol):
    def checkpoint(self) -> int: ...
    def write(self, outputs: dict, *, frames: int, status: str) -> None: ...


@dataclass
class LiveSettings:
    poll_interval: float = 0.2      # first poll after a quiet period
    max_poll_interval: float = 2.0  # backoff ceiling when idle
    idle_timeout: float = 600.0     # no new frames and no stop document for this long → fail
    max_batch: int = 256            # frames read per request (bounds memory)
    #: after a running write that took w seconds, the next waits until
    #: pacing×(w − pace_above) has passed (frames keep being fed meanwhile): a write up to
    #: ``pace_above`` seconds is followed at once by the next (each frame's lag is its one
    #: write), a slower one -- the server or machine overloaded -- makes writes coalesce into
    #: fewer, larger batches; pacing 0 writes after every batch.
    write_pacing: float = 1.0
    #: Writes this quick are never paced.  Pacing a write by its own time w adds about w to
    #: every frame's lag (benchmarks/results/live_lag.md: at a 10 Hz scan with 0.3-0.5 s
    #: writes it took P2's push lag from 0.09 s to 0.34 s p50, for ~10 % less live CPU in P4),
    #: so it is kept for writes that already miss the live-lag budget (0.5 s p95).
    pace_above: float = 0.5


@dataclass
class PostSettings:
    wait_timeout: float = 3600.0    # how long to wait for the stop document
    poll_interval: float = 0.5
    max_poll_interval: float = 10.0


#: (frames done, frames known, message); message "live": a live batch (counted, not shown)
Progress = Callable[[int, int | None, str], None]


def _noop(done, total, message):
    pass


def wait_for_stop(source: RawSource, settings: PostSettings, sleep=time.sleep) -> RawStatus:
    """Bounded wait, with backoff, for the raw run's stop document."""
    deadline = time.monotonic() + settings.wait_timeout
    interval = settings.poll_interval
    while True:
        status = source.status()
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise RunNotFinished(f"raw run has no stop document after {settings.wait_timeout:.0f}s "
                                 f"({status.frames} frames so far)")
        sleep(interval)
        interval = min(interval * 2, settings.max_poll_interval)


def run_post(spec: AnalysisSpec, source: RawSource, sink: ResultSink, settings: PostSettings | None = None,
             progress: Progress = _noop, sleep=time.sleep) -> dict:
    settings = settings or PostSettings()
    status = wait_for_stop(source, settings, sleep)
    if status.exit_status != "success":
        raise RunAborted(f"raw run ended with exit_status={status.exit_status!r}; post processing refuses "
                         "partial data (use the live variant's result, or re-run with a successful scan)")
    if status.frames == 0:
        raise _empty(spec, status)
    progress(0, status.frames, "reading")
    data = source.read(0, status.frames)
    outputs = spec.compute(data)
    sink.write(outputs, frames=status.frames, status="complete")
    progress(status.frames, status.frames, "complete")
    return outputs


def run_live(spec: AnalysisSpec, source: RawSource, sink: ResultSink, settings: LiveSettings | None = None,
             progress: Progress = _noop, sleep=time.sleep, clock=time.monotonic) -> dict:
    settings = settings or LiveSettings()
    done = sink.checkpoint()
    state = spec.start_incremental()
    outputs: dict | None = None

    blocks = getattr(source, "blocks", None)  # a source that prefetches the next block (TiledRawRun)

    def feed(start: int, stop: int) -> None:
        if blocks is not None and stop - start > settings.max_batch:
            for block in blocks(start, stop, settings.max_batch):
                state.update(**block)
            return
        for lo in range(start, stop, settings.max_batch):
            state.update(**source.read(lo, min(lo + settings.max_batch, stop)))

    if done and state is not None:
        log.info("resuming live %s from checkpoint: replaying %d frames", spec.name, done)
        feed(0, done)
    wait_for_change = getattr(source, "wait_for_change", None)
    written, next_write = done, -float("inf")

    def write_running(outs, frames: int) -> float:
        """Write a running result; returns when the next running write may be made."""
        nonlocal written
        t0 = clock()
        sink.write(outs, frames=frames, status="running")
        written = frames
        end = clock()
        return end + settings.write_pacing * max(0.0, end - t0 - settings.pace_above)

    last_compute = -float("inf")
    last_progress = clock()
    interval = settings.poll_interval
    while True:
        status = source.status()
        if status.frames < done:
            raise RunError(f"raw run shrank: {status.frames} frames < checkpoint {done}")
        if status.frames > done:
            last_progress = clock()
            progress(done, status.frames, "live")   # behind by this much (metrics only: flow/metrics.py)
            if state is not None:
                feed(done, status.frames)
                done = status.frames
                outputs = check_outputs(spec.name, state.result())
            elif clock() - last_compute >= spec.live_throttle or status.finished:
                done = status.frames
                outputs = spec.compute(source.read(0, done))
                last_compute = clock()
            else:  # plain form, throttled: wait for the next slot, frames keep arriving
                sleep(max(0.0, min(settings.poll_interval, spec.live_throttle - (clock() - last_compute))))
                continue
            if clock() >= next_write:
                next_write = write_running(outputs, done)
            progress(done, status.frames, "live")
            interval = settings.poll_interval
            continue  # drain: look again at once
        if status.finished:
            break  # stop document seen and every frame processed: final drain done
        if written < done and clock() >= next_write:  # a paced write still owed: make it now
            next_write = write_running(outputs, done)
            continue
        if clock() - last_progress > settings.idle_timeout:
            raise LiveIdleTimeout(f"no new frames and no stop document for {settings.idle_timeout:.0f}s "
                                  f"after {done} frames")
        wait = interval if written >= done else max(0.0, min(interval, next_write - clock()))
        if wait_for_change is not None:
            wait_for_change(wait)
        else:
            sleep(wait)
        interval = min(interval * 1.5, settings.max_poll_interval)

    if outputs is None:  # zero frames, or plain form whose last compute is already current
        outputs = check_outputs(spec.name, state.result()) if state is not None and done else (
            spec.compute(source.read(0, done)) if done else None)
    final_status = "complete" if status.exit_status == "success" else f"ended:{status.exit_status}"
    if outputs is None:
        if status.exit_status == "success":
            raise _empty(spec, status)
        raise RunAborted(f"raw run ended ({status.exit_status}) with no frames to analyse")
    sink.write(outputs, frames=done, status=final_status)
    progress(done, done, final_status)
    if status.exit_status != "success":
        raise RunAborted(f"raw run ended with exit_status={status.exit_status!r} after {done} frames; "
                         "the partial live result is kept with status " + final_status)
    return outputs
