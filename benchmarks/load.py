"""The machine's load average at the start and end of a benchmark run, and a warning above 1.

Every number in benchmarks/ is a ratio measured side by side in one run, but absolute figures
only mean something with the load they were taken under: the run records it and says so.
"""

from __future__ import annotations

import os
import sys

__all__ = ["LoadWatch", "WARN_ABOVE"]

#: A 1-minute load average above this (per machine, not per core) means other work competed.
WARN_ABOVE = 1.0


class LoadWatch:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = os.getloadavg()
        self.stop: tuple[float, float, float] | None = None
        self._warn("start", self.start)

    def _warn(self, when, load):
        if load[0] > WARN_ABOVE:
            print(f"[bench] WARNING: load average at {when} is {load[0]:.2f} (> {WARN_ABOVE:g}) on "
                  f"{os.cpu_count()} cores: absolute times are inflated; compare the ratios", file=self.stream,
                  flush=True)

    def end(self):
        self.stop = os.getloadavg()
        self._warn("end", self.stop)
        return self.stop

    def note(self) -> str:
        def fmt(t):
            return "/".join(f"{x:.2f}" for x in t) if t else "?"
        head = f"Load average (1/5/15 min) at start {fmt(self.start)}, at end {fmt(self.stop)}"
        if self.start[0] > WARN_ABOVE:
            return (head + f" — **above {WARN_ABOVE:g} at the start: the machine was shared, absolute times are "
                    f"inflated; the ratios are from one run, side by side.**")
        if self.stop and self.stop[0] > WARN_ABOVE:
            # a quiet start and a busy end: the run's own servers and bursts (P7 runs 20 analyses at
            # once) load a 2-core machine; other work cannot be told apart from that by these numbers
            return (head + f" — quiet at the start; above {WARN_ABOVE:g} at the end, which on this machine is "
                    f"also the run's own load (its bursts): the ratios are from one run, side by side.")
        return head + "."

    def as_dict(self) -> dict:
        return {"start": list(self.start), "end": list(self.stop) if self.stop else None}
