"""Example beamline plans for blueapi, one of them wired to a visitflow analysis.

blueapi loads this module through its config (``env.sources``, ``kind: planFunctions``) and
lists every plan with typed parameters that returns ``MsgGenerator``; ``@uses_analyses``
keeps the name, signature and type hints, so the decorated plan is listed like any other.

The detector is simulated here, in-plan, with nothing but numpy and bluesky (blueapi's
environment has no ophyd v1): a scalar Gaussian peak along the scanned position.  Values
are read in-event, so blueapi's TiledWriter (bluesky 1.15's) puts them in the stream's
table.  Scalars only, on purpose: that writer puts an array read in-event into a table
column of lists, which Tiled's SQLite tabular storage refuses ("Unsupported PyArrow type:
list<item: float>") and a 2-D frame not at all — a real area detector writes files and
announces them with StreamResource documents instead.  Each plan returns its run's uid
(blueapi reports it as the task result).
"""

from __future__ import annotations

import time

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from visitflow.trigger import uses_analyses


class SimReadable:
    """A bluesky Readable whose value comes from ``func()`` at each read."""

    def __init__(self, name: str, func):
        self.name, self.parent, self._func = name, None, func

    def read(self):
        return {self.name: {"value": self._func(), "timestamp": time.time()}}

    def describe(self):
        return {self.name: {"source": f"sim://{self.name}", "dtype": "number", "shape": [],
                            "dtype_numpy": "<f8"}}


def _scan(num: int, seed: int, delay: float, start: float = -2.0, stop: float = 2.0,
          center: float = 0.3, sigma: float = 0.6) -> MsgGenerator:
    rng = np.random.default_rng(seed)
    position = {"x": 0.0}

    def peak():
        return float(1000.0 * np.exp(-((position["x"] - center) ** 2) / (2 * sigma ** 2)) + rng.uniform(0, 5))

    readables = [SimReadable("det", peak), SimReadable("motor", lambda: position["x"])]
    uid = yield from bps.open_run()   # (the RunEngine closes it as failed if the plan raises)
    for i in range(num):
        position["x"] = start + (stop - start) * i / max(num - 1, 1)
        yield from bps.trigger_and_read(readables)
        if delay:
            yield from bps.sleep(delay)
    yield from bps.close_run()
    return uid


@uses_analyses("peak_stats")
def peak_scan(num: int = 12, seed: int = 0, delay: float = 0.0) -> MsgGenerator:
    """A step scan across a simulated peak; its runs start the peak_stats analysis."""
    return (yield from _scan(num, seed, delay))


def plain_scan(num: int = 5, seed: int = 0) -> MsgGenerator:
    """The same scan without analyses: visitflow must leave it alone."""
    return (yield from _scan(num, seed, 0.0))
