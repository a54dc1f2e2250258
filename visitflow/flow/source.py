"""A raw bluesky run in Tiled, as the engine's :class:`~visitflow.flow.engine.RawSource`.

TiledWriter (bluesky-tiled-plugins 2.x) writes a run as a container keyed by the start uid,
with the start/stop documents in its metadata and one composite container per stream whose
children are arrays (detector frames as zarr arrays, scalar columns from the internal
table) — so every field reads the same way: ``run[stream][field][a:b]``.  Live reads
refresh the run node (for the stop document) and fetch each needed field (for its shape) on
each poll: 1 + len(reads) requests.  Frame data is fetched by :meth:`TiledRawRun.read` in
parallel storage-chunk-aligned requests streamed into one array (see ``_read_field``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .engine import RawStatus
from ..errors import MissingField

__all__ = ['TiledRawRun', 'request_frames', 'RAW_HEADERS']


class TiledRawRun:
    def __init__(self, run_node, reads: tuple[str, ...], stream: str = "primary", read_workers: int = 4,
                 chunk_bytes: int = 16 << 20):
        self.run = run_node
        self.reads = tuple(reads)
        self.stream = stream
        self.read_workers = read_workers
        self.chunk_bytes = chunk_bytes
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
        return {f: self._read_field(self._fields[f], start, stop) for f in self.reads}

    def _read_field(self, arr, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` of one field: storage-chunk-aligned requests of about
        ``chunk_bytes``, up to ``read_workers`` at once, each streamed straight into the
        result array.

        Measured in benchmarks/post_read.py (P3, profile in benchmarks/RESULTS.md): the server's
        cost per request is mostly fixed (catalog lookup, auth, dependency injection) plus
        the storage decode, so requests cover whole storage chunks (no chunk decoded twice)
        and are few; two or more in flight keep both the server's decode and our copy busy.
        The body is asked for as ``application/octet-stream`` with ``identity`` encoding
        (detector floats hardly compress: zstd costs CPU on both ends for nothing) and
        written into the preallocated result as it arrives — one copy, socket to array,
        where the stock client's ``arr[a:b]`` joins the body, wraps it and copies again.
        """
        shape, dtype = tuple(arr.shape), _numpy_dtype(arr)
        frame_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        step = request_frames(frame_bytes, self.chunk_bytes, _stored_frames_per_chunk(arr))
        out = np.empty((stop - start, *shape[1:]), dtype=dtype)
        bounds = [(a, min(a + step, stop)) for a in range(start, stop, step)]

        def fetch(bound):
            a, b = bound
            _fetch_into(arr, a, b, out[a - start:b - start])

        if len(bounds) == 1 or self.read_workers <= 1:
            for bound in bounds:
                fetch(bound)
            return out
        with ThreadPoolExecutor(min(self.read_workers, len(bounds))) as pool:
            list(pool.map(fetch, bounds))
        return out

    def blocks(self, start: int, stop: int, size: int):
        """``read`` of ``[start, stop)`` in blocks of ``size`` frames, the next block fetched
        while the caller works on this one (the engine's replay/catch-up loop uses it)."""
        spans = [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]
        if len(spans) <= 1:
            for lo, hi in spans:
                yield self.read(lo, hi)
            return
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.read, *spans[0])
            for nxt in spans[1:]:
                block = pending.result()
                pending = pool.submit(self.read, *nxt)
                yield block
            yield pending.result()


def request_frames(frame_bytes: int, chunk_bytes: int, stored: int | None) -> int:
    """Frames per request: about ``chunk_bytes``, rounded to whole storage chunks (at least one)."""
    step = max(1, chunk_bytes // max(1, frame_bytes))
    if stored:
        step = max(stored, step - step % stored)
    return step


def _numpy_dtype(arr) -> np.dtype:
    dt = arr.dtype
    return np.dtype(dt.to_numpy_dtype() if hasattr(dt, "to_numpy_dtype") else dt)


#: What we ask the server for: raw bytes, not compressed (see ``_read_field``).
RAW_HEADERS = {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}


def _fetch_into(arr, a: int, b: int, out: np.ndarray) -> None:
    """Frames ``[a, b)`` of ``arr`` into ``out`` (C-contiguous, of the right shape and dtype).

    Over the node's own HTTP client (its auth, its base URL) and the ``full`` link of Tiled's
    HTTP API.  A node without that link (not a plain array), a body of the wrong length, or
    a transport error falls back to the stock client (``arr[a:b]``, which retries)."""
    import httpx

    url = (getattr(arr, "item", None) or {}).get("links", {}).get("full")
    if url is None or out.size == 0:
        out[...] = np.asarray(arr[a:b])
        return
    params = {"slice": f"{a}:{b}", "expected_shape": ",".join(map(str, out.shape))}
    try:
        if _stream_into(arr.context.http_client, url, params, memoryview(out.reshape(-1).view(np.uint8))):
            return
    except httpx.TransportError:
        pass
    out[...] = np.asarray(arr[a:b])


def _stream_into(client, url: str, params: dict, view: memoryview) -> bool:
    """GET the raw body into ``view``; False if its length was not the slice's size (e.g. a
    content-encoding we did not ask for), so the caller falls back.  Error statuses raise."""
    with client.stream("GET", url, params=params, headers=RAW_HEADERS) as resp:
        if resp.is_error:
            resp.read()
            _raise_for(resp)
        pos = 0
        for piece in resp.iter_raw():
            end = pos + len(piece)
            if end > view.nbytes:
                return False
            view[pos:end] = piece
            pos = end
        return pos == view.nbytes


def _raise_for(resp) -> None:
    """Raise as the stock client does for an error response (404 → KeyError, 4xx → ClientError)."""
    try:
        from tiled.client.utils import handle_error
    except ImportError:  # pragma: no cover - older/newer tiled: plain httpx error
        resp.raise_for_status()
    else:
        handle_error(resp)
    resp.raise_for_status()


def _stored_frames_per_chunk(arr) -> int | None:
    try:
        chunks = arr.structure().chunks[0]
        return int(chunks[0]) if chunks else None
    except Exception:  # noqa: BLE001 - only an optimisation
        return None
