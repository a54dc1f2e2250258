"""In-memory RawSource/ResultSink for unit tests of the engine's pure logic."""

from dataclasses import dataclass, field

import numpy as np

from visitflow.engine import RawStatus


@dataclass
class MemoryRun:
    """A raw run whose frames appear when ``publish`` is called (e.g. from the sleep hook)."""

    data: dict
    visible: int = 0
    finished: bool = False
    exit_status: str = "success"
    reads_log: list = field(default_factory=list)

    def publish(self, n: int) -> None:
        total = len(next(iter(self.data.values())))
        self.visible = min(total, self.visible + n)
        if self.visible == total:
            self.finished = True

    def status(self) -> RawStatus:
        return RawStatus(self.visible, self.finished, self.exit_status if self.finished else None)

    def read(self, start, stop):
        assert 0 <= start <= stop <= self.visible, (start, stop, self.visible)
        self.reads_log.append((start, stop))
        return {k: np.asarray(v[start:stop]) for k, v in self.data.items()}


@dataclass
class MemorySink:
    checkpoint_frames: int = 0
    writes: list = field(default_factory=list)

    def checkpoint(self) -> int:
        return self.checkpoint_frames

    def write(self, outputs, *, frames, status):
        self.writes.append((dict(outputs), frames, status))
        self.checkpoint_frames = frames
