"""A raw bluesky run in Tiled, as the engine's :class:`~visitflow.engine.RawSource`.

TiledWriter (bluesky-tiled-plugins 2.x) writes a run as a container keyed by the start uid,
with the start/stop documents in its metadata and one composite container per stream whose
children are arrays (detector frames as zarr arrays, scalar columns from the internal
table) — so every field reads the same way: ``run[stream][field][a:b]``.  Live reads
refresh the run node (for the stop document) and fetch each needed field (for its shape) on
each poll: 1 + len(reads) requests.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..engine import MissingField, RawStatus


class TiledRawRun:
    def __init__(self, run_node, reads: tuple[str, ...], stream: str = "primary", read_workers: int = 4):
        self.run = run_node
        self.reads = tuple(reads)
        self.stream = stream
        self.read_workers = read_workers
        self._fields: dict[str, Any] = {}

    @property
    def uri(self) -> str:
        return self.run.uri

    def _stream_node(self):
        try:
            return self.run[self.stream]
        except KeyError:
            return None

    def status(self) -> RawStatus:
        self.run.refresh()
        stop = self.run.metadata.get("stop") or None
        node = self._stream_node()
        if node is None:
            if stop:
                # Finished without ever emitting the stream: a field can never appear.
                missing = ", ".join(self.reads)
                raise MissingField(f"raw run has no stream {self.stream!r} (needed for {missing})")
            return RawStatus(0, False)
        fields = {}
        for f in self.reads:  # only the fields we need (a composite fetches each child anyway)
            try:
                fields[f] = node[f]
            except KeyError:
                pass
        missing = [f for f in self.reads if f not in fields]
        if missing and stop:
            raise MissingField(f"raw run stream {self.stream!r} has no field(s) {missing}; "
                               f"it has {sorted(node)}")
        self._fields = fields
        frames = 0 if missing else min(int(fields[f].shape[0]) for f in self.reads)
        return RawStatus(frames, bool(stop), (stop or {}).get("exit_status"))

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if not self._fields:
            self.status()
        if stop <= start:
            return {f: np.asarray(self._fields[f][0:0]) for f in self.reads}
        if len(self.reads) == 1:
            return {self.reads[0]: np.asarray(self._fields[self.reads[0]][start:stop])}
        with ThreadPoolExecutor(min(self.read_workers, len(self.reads))) as pool:
            arrays = pool.map(lambda f: np.asarray(self._fields[f][start:stop]), self.reads)
            return dict(zip(self.reads, arrays))
