"""Check an analysis without servers: an in-memory run and sink, and :func:`check`.

The engine drives an analysis over two small protocols (:class:`visitflow.flow.engine.RawSource`,
:class:`visitflow.flow.engine.ResultSink`); here they are plain Python objects, so an analyst can
run exactly what the worker runs — post, live, a resumed live — on a laptop::

    from visitflow.flow.testing import check
    from flows.peak_stats import peak_stats

    report = check(peak_stats)            # synthetic data shaped from reads=
    assert report.ok, report

:func:`check` runs the post variant, the live variant over several random batch splits, and
a live run that is interrupted and resumed from its checkpoint, and compares each with a
reference (by default the plain function on all the frames at once, in float64).  A wrong
incremental form — one that forgets a batch's weight, or double-counts across a resume —
differs from the reference for some split and fails.  ``visitflow check flows/NAME.py`` is
the same from the shell (:mod:`visitflow.flow.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import engine
from .engine import RawStatus
from .spec import AnalysisSpec
from .. import errors

__all__ = ["MemoryRun", "MemorySink", "CheckReport", "check", "synthetic_data", "spec_of", "load_recorded",
           "load_analyses"]


@dataclass
class MemoryRun:
    """A raw run whose frames appear when ``publish`` is called (e.g. from the sleep hook)."""

    data: dict
    visible: int = 0
    finished: bool = False
    exit_status: str = "success"
    reads_log: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def publish(self, n: int) -> None:
        self.visible = min(self.total, self.visible + n)
        if self.visible == self.total:
            self.finished = True

    def status(self) -> RawStatus:
        return RawStatus(self.visible, self.finished, self.exit_status if self.finished else None)

    def read(self, start, stop):
        assert 0 <= start <= stop <= self.visible, (start, stop, self.visible)
        self.reads_log.append((start, stop))
        return {k: np.asarray(v[start:stop]) for k, v in self.data.items()}


@dataclass
class MemorySink:
    """Keeps every write; its checkpoint is the frames of the last write (as in Tiled)."""

    checkpoint_frames: int = 0
    writes: list = field(default_factory=list)

    def checkpoint(self) -> int:
        return self.checkpoint_frames

    def write(self, outputs, *, frames, status):
        self.writes.append((dict(outputs), frames, status))
        self.checkpoint_frames = frames


@dataclass
class CheckReport:
    """What :func:`check` found: ``ok`` and, if not, one line per disagreement."""

    analysis: str
    frames: int
    runs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.analysis}: {len(self.runs)} runs on {self.frames} frames ({', '.join(self.runs)})"
        return head + (": OK" if self.ok else ":\n  " + "\n  ".join(self.problems))


def spec_of(analysis_or_spec) -> AnalysisSpec:
    """The :class:`AnalysisSpec` of an ``@analysis`` flow (or the spec itself)."""
    spec = getattr(analysis_or_spec, "spec", analysis_or_spec)
    if not isinstance(spec, AnalysisSpec):
        raise TypeError(f"{analysis_or_spec!r} is not an @analysis flow")
    return spec


def _looks_like_position(name: str) -> bool:
    return any(word in name.lower() for word in ("motor", "energy", "position", "theta", "angle", "x", "y", "z"))


def _frame_shapes(spec: AnalysisSpec, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Per-frame shape of each field: the given ones, else scalars if the function accepts
    them, else 8×8 images (a detector)."""
    probe = np.random.default_rng(0)
    out = {f: tuple(shapes.get(f, ())) for f in spec.reads}
    for guess in ((), (8, 8)):
        trial = {f: (out[f] if f in shapes else guess) for f in spec.reads}
        try:
            spec.compute({f: probe.normal(100.0, 1.0, size=(5, *s)) for f, s in trial.items()})
            return trial
        except Exception:  # noqa: BLE001 - the function tells us which shape it does not take
            continue
    return out


def synthetic_data(analysis_or_spec, frames: int = 60, *, seed: int = 0,
                   shapes: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
    """Beamline-like data for each field in ``reads=``: positions far from zero (a motor at
    5.4 mm, an energy near 11 keV), counts of 1e5–1e6 with a large baseline — the values
    that expose float32 sums and one-pass variances."""
    spec = spec_of(analysis_or_spec)
    rng = np.random.default_rng(seed)
    per_frame = _frame_shapes(spec, dict(shapes or {}))
    data = {}
    for f in spec.reads:
        shape = per_frame[f]
        if not shape and _looks_like_position(f):
            data[f] = 11000.0 + np.linspace(-2.0, 2.0, frames) + rng.normal(0, 1e-3, frames)
        else:
            t = np.linspace(-1, 1, frames).reshape((frames,) + (1,) * len(shape))
            data[f] = 2e5 + 8e5 * np.exp(-(t - 0.1) ** 2 / 0.1) + rng.normal(0, 300.0, (frames, *shape))
    return data


def load_analyses(path) -> dict[str, Any]:
    """The ``@analysis`` flows defined in a Python file (``flows/NAME.py``), by name."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path).resolve()
    module_name = f"_visitflow_flows_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # pydantic models resolve their annotations through it
    module_spec.loader.exec_module(module)
    return {name: obj for name, obj in vars(module).items()
            if isinstance(getattr(obj, "spec", None), AnalysisSpec) and hasattr(obj, "fn")}


def load_recorded(path: str) -> dict[str, np.ndarray]:
    """A recorded run saved as ``.npz`` (one array per field, frames first)."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _compare(want: dict, got: dict, rtol: float, atol: float) -> str | None:
    if set(want) != set(got):
        return f"outputs differ: {sorted(want)} vs {sorted(got)}"
    bad = []
    for key in want:
        a, b = np.asarray(want[key], dtype=float), np.asarray(got[key], dtype=float)
        if a.shape != b.shape:
            bad.append(f"{key}: shape {a.shape} vs {b.shape}")
        elif not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            diff = np.nanmax(np.abs(a - b)) if a.size else 0.0
            bad.append(f"{key}: max |difference| {diff:.3g} (reference {np.nanmax(np.abs(a)) if a.size else 0:.6g})")
    return "; ".join(bad) or None


def _splits(rng: np.random.Generator, n: int) -> list[int]:
    """Uneven batch sizes summing to ``n``: singles, a big lump, everything in between."""
    sizes, left = [], n
    while left > 0:
        size = int(min(left, rng.choice([1, 2, 3, rng.integers(1, max(2, n // 2) + 1)])))
        sizes.append(size)
        left -= size
    return sizes


def check(analysis_or_spec, data: dict | None = None, *, frames: int = 60, splits: int = 5, seed: int = 0,
          options: dict | None = None, reference: Callable[[dict], dict] | None = None,
          rtol: float = 1e-9, atol: float = 1e-12, shapes: dict[str, tuple] | None = None) -> CheckReport:
    """Run post, live over ``splits`` random batch splits, and a resumed live; compare each
    with ``reference(data)`` (default: the plain function on all the frames, float64).

    ``data``: ``{field: frames-first array}`` (a recorded run, :func:`load_recorded`), or
    None for :func:`synthetic_data`.  ``options``: the analysis' options, as a plan sets
    them.  Returns a :class:`CheckReport`; nothing here needs a server."""
    spec = spec_of(analysis_or_spec).with_options(options)
    data = data if data is not None else synthetic_data(spec, frames, seed=seed, shapes=shapes)
    missing = [f for f in spec.reads if f not in data]
    if missing:
        raise KeyError(f"data has no {missing} (the analysis reads {list(spec.reads)})")
    data = {f: np.asarray(data[f]) for f in spec.reads}
    n = len(next(iter(data.values())))
    report = CheckReport(spec.name, n)
    as64 = {f: (v.astype(np.float64) if v.dtype.kind in "fiu" else v) for f, v in data.items()}
    want = reference(as64) if reference else spec.compute(as64)
    rng = np.random.default_rng(seed)

    def record(label: str, got: dict) -> None:
        report.runs.append(label)
        problem = _compare(want, got, rtol, atol)
        if problem:
            report.problems.append(f"{label}: {problem}")

    record("post", engine.run_post(spec, MemoryRun(data, visible=n, finished=True), MemorySink()))
    for i in range(splits):
        batches = _splits(rng, n)
        settings = engine.LiveSettings(poll_interval=0, max_poll_interval=0, idle_timeout=60,
                                       max_batch=int(rng.integers(1, max(2, n) + 1)))
        run = MemoryRun(data)
        it = iter(batches)
        got = engine.run_live(spec, run, MemorySink(), settings, sleep=lambda _: run.publish(next(it, n)))
        record(f"live split {i + 1} (max_batch {settings.max_batch}, {len(batches)} publishes)", got)
    if n >= 2:
        report.runs.append("live resumed")
        cut = int(rng.integers(1, n))
        resumed = _resumed_live(spec, data, cut, rng)
        problem = _compare(want, resumed, rtol, atol)
        if problem:
            report.problems.append(f"live resumed from checkpoint {cut}: {problem}")
    return report


def _resumed_live(spec: AnalysisSpec, data: dict, cut: int, rng: np.random.Generator) -> dict:
    """A live run that stops (idle timeout) after ``cut`` frames, then a fresh attempt that
    resumes from the first one's checkpoint — what a worker restart does."""
    n = len(next(iter(data.values())))
    sink = MemorySink()
    first = MemoryRun(data, visible=cut)
    ticks = iter(range(0, 10**9, 10))
    try:
        engine.run_live(spec, first, sink, engine.LiveSettings(poll_interval=0, idle_timeout=5, max_batch=3),
                        sleep=lambda _: None, clock=lambda: next(ticks))
    except errors.LiveIdleTimeout:
        pass
    second = MemoryRun(data, visible=cut)
    step = max(1, int(rng.integers(1, max(2, n // 3) + 1)))
    return engine.run_live(spec, second, sink, engine.LiveSettings(poll_interval=0, max_poll_interval=0,
                                                                   idle_timeout=60, max_batch=4),
                           sleep=lambda _: second.publish(step))


def assert_check(analysis_or_spec, data: dict | None = None, **kwargs: Any) -> CheckReport:
    """:func:`check`, raising ``AssertionError`` with the report if anything disagrees."""
    report = check(analysis_or_spec, data, **kwargs)
    assert report.ok, str(report)
    return report


__all__.append("assert_check")
