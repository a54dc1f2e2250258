"""``python -m benchmarks.analysis_numerics``: accuracy of the shipped analyses, side by side.

Relative error against a correctly rounded float64 two-pass reference (``math.fsum``), on
beamline-like data, for the textbook formulas the analyses avoid and for what they do (post
and live over uneven batches).  No servers; runs in seconds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visitflow.flow import engine  # noqa: E402
from visitflow.flow.testing import MemoryRun, MemorySink, load_analyses  # noqa: E402


def _both(flow, data, batches=(1, 7, 64, 3, 250), max_batch=97):
    n = len(next(iter(data.values())))
    post = engine.run_post(flow.spec, MemoryRun(data, visible=n, finished=True), MemorySink())
    run, it = MemoryRun(data), iter(batches)
    live = engine.run_live(flow.spec, run, MemorySink(),
                           engine.LiveSettings(poll_interval=0, max_poll_interval=0, max_batch=max_batch),
                           sleep=lambda _: run.publish(next(it, n)))
    return post, live


def peak_rows(peak_stats):
    rng = np.random.default_rng(1)
    scans = {
        "energy 11.1 keV (eV), sigma 0.35 eV, 1e5 baseline": (np.linspace(11095.0, 11105.0, 801), 11100.3, 0.35, 1e5),
        "motor 4.5-6.3 mm, sigma 20 um, 3e5 baseline": (np.linspace(4.5, 6.3, 500), 5.41, 0.02, 3e5),
    }
    for label, (x, mu, s, base) in scans.items():
        y = base + 9e5 * np.exp(-(x - mu) ** 2 / (2 * s ** 2))
        data = {"motor": x, "det": rng.normal(y, np.sqrt(y))}
        w = np.clip(data["det"], 0, None)
        sw = math.fsum(w)
        c = math.fsum(w * x) / sw
        sigma = math.sqrt(math.fsum(w * (x - c) ** 2) / sw)
        one_pass = math.sqrt(max((w * x * x).sum() / w.sum() - ((w * x).sum() / w.sum()) ** 2, 0))
        post, live = _both(peak_stats, data)
        yield (f"peak_stats sigma, {label}", abs(one_pass / sigma - 1), abs(post["sigma"] / sigma - 1),
               abs(live["sigma"] / sigma - 1))


def saxs_rows(saxs_average):
    rng = np.random.default_rng(3)
    frames = (4e5 + 6e5 * rng.random((3000, 12, 10))).astype(np.float32)
    want = frames.astype(np.float64).mean(axis=0)
    float32_average = np.average(frames, axis=0)  # what np.average does on float32 frames
    post, live = _both(saxs_average, {"saxs": frames}, batches=(5, 1, 700, 33))
    yield ("saxs_average, 3000 float32 frames of 4e5-1e6 counts", np.max(np.abs(float32_average / want - 1)),
           np.max(np.abs(post["average"] / want - 1)), np.max(np.abs(live["average"] / want - 1)))


def main() -> int:
    peak = load_analyses(REPO / "flows/peak_stats.py")["peak_stats"]
    saxs = load_analyses(REPO / "flows/saxs_average.py")["saxs_average"]
    print("| case | textbook (one-pass / float32) | post | live |")
    print("|---|---|---|---|")
    for label, naive, post, live in [*peak_rows(peak), *saxs_rows(saxs)]:
        print(f"| {label} | {naive:.2e} | {post:.2e} | {live:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
