"""Live by push: follow a raw run through Tiled's websocket stream (tiled#437).

:class:`PushRawRun` is the engine's :class:`~visitflow.flow.engine.RawSource` for ``live``.  It
subscribes (``/api/v1/stream/single/<path>``) to the run's nodes with the flow's data token:

* the run and stream containers, as *notifiers*: a new stream or field node, and the end of
  the run (TiledWriter closes the run's stream after writing the stop document), wake the
  engine and trigger an HTTP look (:meth:`status` via :class:`~.rawrun.TiledRawRun`);
* each node holding a ``reads`` field, as a *feed*: ``array-data`` messages carry the frames
  and their offset (decoded from the payload, no HTTP read); ``table-data`` appends carry
  Arrow rows, placed by their bluesky ``seq_num`` (event N is row N-1 — robust to a
  re-published append and to the sequence numbers Tiled restarts after its own restart);
  ``array-ref`` (external files) only says how far the data goes: those frames are read as
  HTTP slices.

Every engine guarantee is kept because the engine still sees only ``status()`` (frames
present in *every* read field: the minimum, over fields, of what is known to exist — on the
server by shape, or in hand from messages) and ``read(start, stop)`` (from the payloads in
hand, else over HTTP); bounded batches and checkpoints are the engine's.  Polling stays the
fallback and the reconciliation: an HTTP ``status()`` at start, whenever a notifier fires or a
connection drops, and at least every ``reconcile_interval`` seconds; frames known by shape
(``max`` of shape and messages) fill any message that was missed.  A server without a
streaming cache (the subscription fails) simply leaves the source polling.

:meth:`wait_for_change` lets ``run_live`` sleep until a message arrives instead of for a
fixed poll interval.

Why a websocket client of our own (``websockets``' sync client, one thread per node) and not
``tiled.client.stream``'s ``subscribe()``: the stock client sends only API keys; ours sends
the data token — fresh from the token source on every (re)connect — and resumes with
``?start=<last sequence + 1>``.

Where the token goes (issue 19): in an ``Authorization: Bearer`` header on the upgrade
request, so it never appears in a URL (and so in access logs).  Not in Tiled's first-message
auth (``{"type": "auth", "access_token": ...}``) by default: Tiled 0.2.20 started with
``--allow-anonymous`` — as it must be for blueapi's tiled 0.2.18 client — never reads a first
message, so the subscription was anonymous, got a 404 and the live analysis silently fell
back to polling.  Tiled itself takes only ``Apikey`` in a websocket's header;
:class:`visitflow.tiled.auth_gate.AuthGate` hands Tiled the header's bearer token (the one
credential of the request).  A Tiled without that gate answers the header with a 400: the
subscription then switches to first-message auth (:attr:`NodeSubscription.auth`).
:meth:`PushRawRun.stats` says how the run was followed (``followed_by``: ``push`` or
``polling``), and the flow logs it at the end (``live source: ...``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from bisect import bisect_right, insort
from typing import Any, Callable

import httpx
import msgpack
import numpy as np

from .engine import RawStatus
from .source import TiledRawRun

__all__ = ['END_OF_STREAM', 'HEADER', 'FIRST_MESSAGE', 'stream_url', 'FrameCache', 'NodeSubscription', 'PushRawRun']

log = logging.getLogger("visitflow.stream")

#: Close code and reason Tiled uses when the producer closed the node's stream.
END_OF_STREAM = (1000, "Producer ended stream")

#: How a subscription presents its token: the upgrade request's header, or Tiled's first message.
HEADER, FIRST_MESSAGE = "header", "first-message"


def stream_url(node_uri: str) -> str:
    """``http://h/api/v1/metadata/raw/a1/u`` -> ``ws://h/api/v1/stream/single/raw/a1/u``."""
    marker = "/api/v1/metadata/"
    i = node_uri.find(marker)
    if i < 0:
        raise ValueError(f"not a Tiled node URI: {node_uri}")
    base = node_uri[:i].replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/api/v1/stream/single/{node_uri[i + len(marker):].split('?')[0]}"


class FrameCache:
    """Frames in hand for one field: chunks keyed by first frame, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._starts: list[int] = []
        self._chunks: dict[int, np.ndarray] = {}
        self.nbytes = 0

    def put(self, start: int, frames: np.ndarray) -> None:
        if not len(frames):
            return
        old = self._chunks.get(start)
        if old is not None:
            self.nbytes -= old.nbytes
        else:
            insort(self._starts, start)
        self._chunks[start] = frames
        self.nbytes += frames.nbytes
        while self.nbytes > self.max_bytes and len(self._starts) > 1:
            self._drop(self._starts[0])

    def _drop(self, start: int) -> None:
        self._starts.remove(start)
        self.nbytes -= self._chunks.pop(start).nbytes

    def prune(self, below: int) -> None:
        """Forget chunks that end at or before ``below`` (frames the engine has consumed)."""
        while self._starts and self._starts[0] + len(self._chunks[self._starts[0]]) <= below:
            self._drop(self._starts[0])

    def contiguous_end(self, start: int) -> int:
        """The end of the run of frames in hand that starts at or before ``start``."""
        end = start
        i = max(0, bisect_right(self._starts, end) - 1)
        while i < len(self._starts):
            s = self._starts[i]
            if s > end:
                break
            end = max(end, s + len(self._chunks[s]))
            i += 1
        return end

    def get(self, start: int, stop: int) -> np.ndarray | None:
        """Frames ``[start, stop)`` if all are in hand, else None."""
        if self.contiguous_end(start) < stop:
            return None
        parts, pos = [], start
        i = max(0, bisect_right(self._starts, start) - 1)
        while pos < stop:
            s = self._starts[i]
            chunk = self._chunks[s]
            if s + len(chunk) > pos:
                parts.append(chunk[pos - s:min(stop - s, len(chunk))])
                pos = s + min(stop - s, len(chunk))
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class NodeSubscription(threading.Thread):
    """One node's websocket stream: connect, authenticate, resume, reconnect with a fresh token.

    ``on_message(sub, message)`` gets every decoded message (schema first); ``on_change()`` is
    called on connect, disconnect and end of stream.  Gives up (``disabled``) after
    ``max_failures`` consecutive failed attempts without ever being served, e.g. a Tiled with
    no streaming cache: the source then simply polls.  ``auth`` starts as :data:`HEADER` and
    becomes :data:`FIRST_MESSAGE` if the server refuses a bearer header as malformed (400):
    a Tiled without visitflow's gate.
    """

    def __init__(self, url: str, token: Callable[[], str], on_message, on_change, *,
                 max_failures: int = 3, open_timeout: float = 10.0, max_backoff: float = 5.0,
                 auth: str = HEADER):
        super().__init__(name=f"visitflow-ws-{url.rsplit('/', 1)[-1][:24]}", daemon=True)
        self.url = url
        self.token = token
        self.on_message = on_message
        self.on_change = on_change
        self.max_failures = max_failures
        self.open_timeout = open_timeout
        self.max_backoff = max_backoff
        self.auth = auth
        self.last_seq = 0
        self.connected = False
        self.ended = False       # the producer closed the stream (end of run)
        self.disabled = False    # never served: no stream on this server (or not for us)
        self.served = False
        self.connects = 0
        self.messages = 0
        self.close_reason: str | None = None
        self._stopping = threading.Event()   # not ``_stop``: Thread.join() calls its own _stop()
        self._ws = None

    def stop(self) -> None:
        self._stopping.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - already closing
                pass

    @property
    def healthy(self) -> bool:
        return self.connected or self.ended

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect

        failures, backoff = 0, 0.2
        while not self._stopping.is_set() and not self.ended:
            start = self.last_seq + 1
            token = self.token()
            headers = {"Authorization": f"Bearer {token}"} if self.auth == HEADER else None
            try:
                with connect(f"{self.url}?envelope_format=msgpack&start={start}", open_timeout=self.open_timeout,
                             max_size=None, close_timeout=2, additional_headers=headers) as ws:
                    self._ws = ws
                    if self.auth == FIRST_MESSAGE:
                        ws.send(json.dumps({"type": "auth", "access_token": token}))
                    first = True
                    while not self._stopping.is_set():
                        try:
                            raw = ws.recv(timeout=1.0)
                        except TimeoutError:
                            continue
                        message = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                        if first:  # the schema: the server accepted our token and path
                            first = False
                            self.connected, self.served = True, True
                            self.connects += 1
                            failures, backoff = 0, 0.2
                            self.on_change()
                        seq = message.get("sequence")
                        if isinstance(seq, int):
                            self.last_seq = seq
                            self.messages += 1
                        self.on_message(self, message)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")
                self.close_reason = f"{code} {reason}".strip()
                if (code, reason) == END_OF_STREAM:
                    self.ended = True
                elif not self.connected:
                    failures += 1
            except InvalidStatus as exc:   # the handshake was answered with an HTTP refusal
                self.close_reason = _refusal(exc)
                if self.auth == HEADER and exc.response.status_code == 400 and "Apikey" in self.close_reason:
                    log.info("%s takes no bearer header (no visitflow gate): using first-message auth", self.url)
                    self.auth = FIRST_MESSAGE
                    continue
                failures += 1
            except Exception as exc:  # noqa: BLE001 - network, server gone
                self.close_reason = f"{type(exc).__name__}: {exc}"
                failures += 1
            finally:
                self._ws = None
                was = self.connected
                self.connected = False
            if was or self.ended or failures:
                self.on_change()
            if self.ended or self._stopping.is_set():
                break
            if not self.served and failures >= self.max_failures:
                self.disabled = True
                log.info("no stream at %s (%s): following this node by polling", self.url, self.close_reason)
                self.on_change()
                break
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)


def _refusal(exc) -> str:
    """``HTTP 404: {"detail": ...}`` for a refused handshake (the reason is in the body)."""
    body = exc.response.body or b""
    return f"HTTP {exc.response.status_code}: {body.decode('utf-8', 'replace')[:200]}".strip()


class _Feed:
    """What is known of one node holding read fields (an array, or a table's columns)."""

    def __init__(self, sub: NodeSubscription, fields: tuple[str, ...], kind: str, max_bytes: int):
        self.sub = sub
        self.fields = fields
        self.kind = kind            # "array" | "table"
        self.dtype = None
        self.caches = {f: FrameCache(max_bytes) for f in fields}
        self.ref_end = 0            # frames known to exist from array-ref messages


class PushRawRun:
    """A :class:`TiledRawRun` followed by push; see the module docstring."""

    def __init__(self, poll: TiledRawRun, token: Callable[[], str], *, reconcile_interval: float = 5.0,
                 max_cache_bytes: int = 256 << 20):
        self.poll = poll
        self.reads = poll.reads
        self.token = token
        self.reconcile_interval = reconcile_interval
        self.max_cache_bytes = max_cache_bytes
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self._subs: dict[str, NodeSubscription] = {}
        self._feeds: dict[str, _Feed] = {}          # field -> feed (several fields may share one)
        self._feed_of: dict[NodeSubscription, _Feed] = {}
        self._http_frames: dict[str, int] = {}
        self._reconcile = True
        self._last_http = -float("inf")
        self._http_status: RawStatus | None = None
        self._consumed = 0
        self.http_polls = 0
        self.push_reads = 0
        self.http_reads = 0
        self._closed = False

    @property
    def uri(self) -> str:
        return self.poll.uri

    # -- subscriptions --------------------------------------------------------------------
    def _subscribe(self, uri: str, on_message, feed: tuple[tuple[str, ...], str] | None = None) -> NodeSubscription:
        sub = self._subs.get(uri)
        if sub is None:
            sub = NodeSubscription(stream_url(uri), self.token, on_message, self._on_change)
            if feed is not None:  # registered before the thread starts: no message can miss it
                fields, kind = feed
                self._feed_of[sub] = _Feed(sub, fields, kind, self.max_cache_bytes)
                for f in fields:
                    self._feeds[f] = self._feed_of[sub]
            self._subs[uri] = sub
            sub.start()
        return sub

    def _on_change(self) -> None:
        self._reconcile = True
        self._changed.set()

    def _on_notice(self, sub, message) -> None:
        if message.get("type") == "container-child-created":
            self._on_change()

    def _on_feed(self, sub, message) -> None:
        kind = message.get("type")
        feed = self._feed_of.get(sub)
        if feed is None:
            return
        try:
            if kind == "array-schema":
                from tiled.structures.array import BuiltinDtype

                feed.dtype = BuiltinDtype.from_json(message["data_type"]).to_numpy_dtype()
            elif kind == "array-data":
                self._take_array(feed, message)
            elif kind == "array-ref":
                patch, shape = message.get("patch"), message.get("shape") or [0]
                end = (patch["offset"][0] + patch["shape"][0]) if patch else shape[0]
                feed.ref_end = max(feed.ref_end, int(end))
            elif kind == "table-data":
                self._take_rows(feed, message)
            else:
                return
        except Exception as exc:  # noqa: BLE001 - an odd message must not kill the feed: poll instead
            log.warning("could not use %s message from %s: %s", kind, sub.url, exc)
            self._reconcile = True
        self._changed.set()

    def _take_array(self, feed: _Feed, message: dict) -> None:
        payload = message.get("payload")
        if payload is None or feed.dtype is None or message.get("mimetype") != "application/octet-stream" \
                or message.get("block") is not None:
            self._reconcile = True  # data we cannot place: learn it by shape
            return
        shape = tuple(message["shape"])
        frames = np.frombuffer(payload, dtype=feed.dtype).reshape(shape)
        start = int((message.get("offset") or [0])[0])
        with self._lock:
            feed.caches[feed.fields[0]].put(start, frames)

    def _take_rows(self, feed: _Feed, message: dict) -> None:
        import pyarrow as pa

        payload = message.get("payload")
        if payload is None or message.get("mimetype") != "application/vnd.apache.arrow.file":
            self._reconcile = True
            return
        table = pa.ipc.open_file(pa.BufferReader(payload)).read_all()
        if "seq_num" not in table.column_names or not len(table):
            self._reconcile = True
            return
        seq = np.asarray(table.column("seq_num").to_numpy(), dtype=np.int64)
        first = int(seq[0]) - 1
        if first < 0 or not np.array_equal(seq, np.arange(first + 1, first + 1 + len(seq))):
            self._reconcile = True  # not one contiguous block of events: read by shape
            return
        with self._lock:
            for f in feed.fields:
                if f in table.column_names:
                    feed.caches[f].put(first, np.asarray(table.column(f).to_numpy(zero_copy_only=False)))

    def _ensure_subscriptions(self) -> None:
        """Subscribe to the run, its stream and the nodes of the read fields that exist now."""
        if len(self._feeds) == len(self.reads):
            return
        run = self.poll.run
        self._subscribe(run.uri, self._on_notice)
        node = self.poll._stream_node()
        if node is None:
            return
        self._subscribe(node.uri, self._on_notice)
        missing = [f for f in self.reads if f not in self._feeds]
        if not missing:
            return
        base = getattr(node, "base", node)
        for key in list(base):
            child = base[key]
            family = getattr(child, "structure_family", None)
            if family == "array" and key in missing:
                fields, kind = (key,), "array"
            elif family == "table":
                columns = set(child.columns) if hasattr(child, "columns") else set()
                fields, kind = tuple(f for f in missing if f in columns), "table"
            else:
                continue
            if fields:
                self._subscribe(child.uri, self._on_feed, (fields, kind))

    # -- RawSource ------------------------------------------------------------------------
    def _push_live(self) -> bool:
        return len(self._feeds) == len(self.reads) and all(f.sub.healthy for f in self._feeds.values())

    def _known(self, field: str) -> int:
        http = self._http_frames.get(field, 0)
        feed = self._feeds.get(field)
        if feed is None:
            return http
        # Frames below what the engine already consumed were available when it read them.
        base = max(http, feed.ref_end, self._consumed)
        with self._lock:
            return feed.caches[field].contiguous_end(base)

    def status(self) -> RawStatus:
        due = time.monotonic() - self._last_http >= self.reconcile_interval
        ended = bool(self._subs) and all(s.ended for s in self._subs.values())
        if self._reconcile or due or not self._push_live() or ended:
            self._reconcile = False
            try:
                status = self.poll.status()  # may raise MissingField after the stop document: as polling does
            except httpx.TransportError as exc:
                if self._http_status is None:
                    raise
                # Tiled is away (a restart): keep following by what we know; the engine's
                # idle timeout bounds how long it may stay away.
                # The last HTTP status may be older than what push delivered and the engine
                # consumed (CI once saw "raw run shrank: 9 < checkpoint 12" here): never less.
                log.warning("Tiled unreachable (%s): retrying", exc)
                self._reconcile = True
                return RawStatus(max(self._http_status.frames, self._consumed), False, None)
            self.http_polls += 1
            self._last_http = time.monotonic()
            for f, arr in self.poll._fields.items():
                self._http_frames[f] = int(arr.shape[0])
            self._http_status = status
            if not self._closed:
                self._ensure_subscriptions()
        status = self._http_status
        if status.finished:
            return status  # the stop document and final shapes come from HTTP: exact
        frames = min(self._known(f) for f in self.reads) if all(f in self._http_frames or f in self._feeds
                                                                 for f in self.reads) else 0
        return RawStatus(max(frames, status.frames), False, None)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = {}
        if not self.poll._fields:
            self.poll.status()
        for f in self.reads:
            feed = self._feeds.get(f)
            got = None
            if feed is not None and stop > start:
                with self._lock:
                    got = feed.caches[f].get(start, stop)
            if got is not None:
                self.push_reads += 1
                out[f] = got
            else:
                self.http_reads += 1
                out[f] = self._read_http(f, start, stop)
        self._consumed = max(self._consumed, stop)
        with self._lock:
            for feed in list(self._feed_of.values()):
                for cache in feed.caches.values():
                    cache.prune(start)
        return out

    def _read_http(self, field: str, start: int, stop: int, patience: float = 120.0) -> np.ndarray:
        deadline = time.monotonic() + patience
        while True:
            try:
                return self._read_http_once(field, start, stop)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("Tiled unreachable (%s): retrying the read", exc)
                time.sleep(1.0)

    def _read_http_once(self, field: str, start: int, stop: int) -> np.ndarray:
        arr = self.poll._fields.get(field)
        if arr is None or int(arr.shape[0]) < stop:
            self.poll.status()  # refresh shapes: the frames exist (a message said so)
            self.http_polls += 1
            arr = self.poll._fields[field]
        if stop <= start:
            return np.asarray(arr[0:0])
        return self.poll._read_field(arr, start, stop)

    def wait_for_change(self, timeout: float) -> bool:
        """Block until a message arrives (True) or ``timeout`` seconds pass (False)."""
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed

    @property
    def followed_by(self) -> str:
        """``push`` if every read field's node was served by its stream, else ``polling``."""
        feeds = set(self._feed_of.values())
        served = len(self._feeds) == len(self.reads) and all(f.sub.served and not f.sub.disabled for f in feeds)
        return "push" if served else "polling"

    def stats(self) -> dict[str, Any]:
        return {"followed_by": self.followed_by,
                "http_polls": self.http_polls, "push_reads": self.push_reads, "http_reads": self.http_reads,
                "subscriptions": {s.url: {"connects": s.connects, "messages": s.messages, "ended": s.ended,
                                          "disabled": s.disabled, "auth": s.auth, "close": s.close_reason}
                                  for s in self._subs.values()}}

    def close(self) -> None:
        self._closed = True
        for sub in self._subs.values():
            sub.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
