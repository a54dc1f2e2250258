"""Processed results in Tiled, as the engine's :class:`~visitflow.flow.engine.ResultSink`.

Layout under the processed template (default ``processed/<visit>/<run>/<analysis>``)::

    <analysis>/               metadata: current -> the child holding the best result,
                              and that result's provenance (copied, for quick reading)
    <analysis>/live/          the live variant's outputs; metadata: provenance, status,
                              frames_processed (the checkpoint)
    <analysis>/post-<id8>/    one post run's outputs (id8 = its flow run id, shortened)

Arrays are array nodes; scalars are a one-row table ``scalars`` (and, for quick reading,
in metadata).

Why versions and a pointer: Tiled has no rename, and rewriting several arrays in place is
not atomic.  A re-run of post writes a *new* ``post-<id8>`` child completely, then moves
the ``current`` pointer (one metadata update — atomic in the catalog), then deletes older
post children.  A reader that follows ``current`` never sees a half-written result; a
reader that is mid-way through an old version keeps a consistent (if stale) one until it
is deleted.

Concurrent post runs of one analysis and run (a manual re-run while the trigger's is still
going, or options changed) need more, because Tiled has no compare-and-swap: the winner is
the *newest complete* child by its ``completed`` time (ties by key), a rule every writer
computes the same way.  Each writer, after completing its own child: points ``current`` at
the newest complete child; deletes only complete or failed children *older than itself*
that are not ``current`` (never one still running — that is another run's work in
progress); then points again.  The last writer to act sees the final set of children, so
the pointer ends on the newest complete result and never on a deleted one.  Live writes in place to ``live`` (each array replaced whole) because it is
by nature a result-in-progress, and says so in ``status``.

Live is fenced (visitflow/tiled/live_fence.py): a live sink given a :class:`~visitflow.core.fence.Fence`
(this flow run's id and attempt) presents it on every request, claims the ``live`` node for
its attempt *before* reading the checkpoint, and turns Tiled's 409 "superseded" into
:class:`~visitflow.errors.Superseded` — the attempt stops; the later one owns the result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from typing import Any, Optional

import numpy as np

from ..core.fence import FENCE_HEADER, FENCE_KEY, Fence, recorded_fence
from ..core.tiled_client import child as _child
from ..core.tiled_client import ensure_container
from ..errors import Superseded

__all__ = ['TiledResultSink', 'read_result']

log = logging.getLogger("visitflow.outputs")


def _now(timespec: str = "seconds") -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


def _rank(key: str, metadata) -> tuple[str, str]:
    """Order of complete post results: newest ``completed`` first, then key (a total order
    every writer agrees on)."""
    return str(metadata.get("completed") or metadata.get("updated") or ""), key


def _fence_refusal(exc: BaseException) -> Optional[str]:
    """Tiled's reason when ``exc`` is its 409 from the live fence (None: another error)."""
    response = getattr(exc, "response", None)
    if response is None or getattr(response, "status_code", None) != 409:
        return None
    try:
        detail = response.json().get("detail")
    except Exception:  # noqa: BLE001 - not JSON: not the fence's answer
        return None
    return detail if isinstance(detail, str) and detail.startswith("live fence:") else None


@contextlib.contextmanager
def _fenced():
    """Tiled's fence refusal, as :class:`Superseded`; other errors unchanged."""
    try:
        yield
    except Superseded:
        raise
    except Exception as exc:
        reason = _fence_refusal(exc)
        if reason is None:
            raise
        raise Superseded(reason) from exc


def _jsonable(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    return value


class TiledResultSink:
    """Write one variant's outputs for one analysis of one run."""

    def __init__(self, run_container, analysis: str, variant: str, provenance: dict, *, flow_run_id: str = "",
                 fence: Optional[Fence] = None):
        self.fence = fence if variant == "live" else None
        if self.fence is not None:
            # On every request of this client (reads too: harmless, and the node objects it
            # hands out share the context); Tiled checks it on writes.
            run_container.context.http_client.headers[FENCE_HEADER] = self.fence.header()
        self.analysis_node = ensure_container(run_container, analysis, {"analysis": analysis})
        self.variant = variant
        self.key = "live" if variant == "live" else f"post-{(flow_run_id or 'local')[:8]}"
        self.provenance = dict(provenance, variant=variant)
        self.node = None
        self._arrays: dict[str, Any] = {}
        self._pointed_live = False

    # ---------------------------------------------------------------- checkpoint
    def checkpoint(self) -> int:
        """Frames already processed by an earlier attempt of this variant (live only)."""
        if self.variant != "live":
            return 0
        if self.fence is not None:
            self.claim()   # first: after the claim no older attempt can move the checkpoint
        node = _child(self.analysis_node, self.key)
        if node is None:
            return 0
        return int(node.metadata.get("frames_processed", 0))

    def claim(self) -> None:
        """Record this attempt as the live node's owner (Tiled refuses it, 409, if a later
        attempt already did: :class:`Superseded`)."""
        mine = {FENCE_KEY: self.fence.metadata()}
        headers = self.analysis_node.context.http_client.headers
        headers[FENCE_HEADER] = self.fence.header(claim=True)   # these requests only: the claim
        try:
            self._claim(mine)
        finally:
            headers[FENCE_HEADER] = self.fence.header()
        log.info("live %s claimed by %s", self.analysis_node.item["id"], self.fence)

    def _claim(self, mine: dict) -> None:
        with _fenced():
            node = _child(self.analysis_node, self.key)
            if node is None:
                node = ensure_container(self.analysis_node, self.key, self._new_metadata())
                if recorded_fence(node.metadata) == self.fence:
                    return
            node.refresh()
            if recorded_fence(node.metadata) != self.fence:
                node.update_metadata(mine, drop_revision=True)

    def _new_metadata(self) -> dict:
        meta = {**self.provenance, "status": "running", "frames_processed": 0, "started": _now()}
        if self.fence is not None:
            meta[FENCE_KEY] = self.fence.metadata()
        return meta

    # ---------------------------------------------------------------- writing
    def _variant_node(self):
        if self.node is None:
            if self.variant == "post":
                stale = _child(self.analysis_node, self.key)
                if stale is not None:  # a retried attempt of the same flow run: start clean
                    stale.delete(recursive=True, external_only=False)
            self.node = ensure_container(self.analysis_node, self.key, self._new_metadata())
            self._arrays = {k: v for k, v in self.node.items()}
        return self.node

    def _write_array(self, key: str, value: np.ndarray) -> None:
        node = self._variant_node()
        existing = self._arrays.get(key)
        if existing is not None and getattr(existing, "shape", None) == value.shape \
                and np.dtype(existing.dtype) == value.dtype:
            existing.write(value)
            return
        if existing is not None:
            existing.delete(recursive=True, external_only=False)
        self._arrays[key] = node.write_array(value, key=key, metadata={"analysis_output": key})

    def write(self, outputs: dict, *, frames: int, status: str) -> None:
        with _fenced():
            self._write(outputs, frames=frames, status=status)

    def _write(self, outputs: dict, *, frames: int, status: str) -> None:
        arrays = {k: np.asarray(v) for k, v in outputs.items() if np.ndim(v) > 0}
        scalars = {k: _jsonable(v) for k, v in outputs.items() if np.ndim(v) == 0}
        for key, value in arrays.items():
            self._write_array(key, np.ascontiguousarray(value))
        final = status != "running"
        if scalars and final:
            import pandas as pd

            if "scalars" in self._arrays:
                self._arrays["scalars"].delete(recursive=True, external_only=False)
            self._arrays["scalars"] = self._variant_node().write_dataframe(
                pd.DataFrame({k: [v] for k, v in scalars.items()}), key="scalars")
        meta = {"status": status, "frames_processed": int(frames), "updated": _now(),
                "outputs": sorted(outputs), "scalars": scalars}
        if final:
            meta["completed"] = _now("microseconds")
        # Outputs first, then the checkpoint: a crash in between only makes a restart redo frames.
        self._variant_node().update_metadata(meta, drop_revision=True)
        if final or self.variant == "live":
            self._point_current(final, meta)

    def _point_current(self, final: bool, meta: dict) -> None:
        if self.variant == "live":
            self._point_current_live(final, meta)
            return
        mine = _rank(self.key, meta)
        self._point_at_newest_post()
        current = self.analysis_node.metadata.get("current")
        for key, node in self._posts().items():
            if key == self.key or key == current or node.metadata.get("status") not in ("complete", "failed"):
                continue  # ours, current, or another run's work in progress
            if _rank(key, node.metadata) < mine:
                try:
                    node.delete(recursive=True, external_only=False)
                except Exception as exc:  # noqa: BLE001 - stale copies are harmless
                    log.warning("could not delete stale result %s: %s", key, exc)
        self._point_at_newest_post()  # a writer racing our deletes may have pointed at one

    def _posts(self) -> dict:
        self.analysis_node.refresh()
        return {key: node for key, node in self.analysis_node.items() if key.startswith("post-")}

    def _point_at_newest_post(self) -> None:
        """Point ``current`` at the newest complete post child, re-reading until it holds."""
        for _ in range(10):
            complete = {k: n for k, n in self._posts().items() if n.metadata.get("status") == "complete"}
            if not complete:
                return
            best = max(complete, key=lambda k: _rank(k, complete[k].metadata))
            if self.analysis_node.metadata.get("current") == best:
                return
            self._set_pointer({"current": best, **dict(complete[best].metadata)})

    def _point_current_live(self, final: bool, meta: dict) -> None:
        """Point ``current`` at live unless a complete post result exists — race-free.

        Live and post of one run often finish within a second of each other, and Tiled has
        no compare-and-swap on metadata.  So: re-read the pointer (the client caches node
        metadata from when it was fetched, and ``update_metadata`` diffs against that copy),
        point at live, then look again for a complete post
        child and hand the pointer back if one appeared.  Post marks its child complete
        *before* moving the pointer, so either that second look sees it, or post's pointer
        write lands after ours; in both cases post wins.
        """
        if not final and self._pointed_live:
            # Running update after we pointed at live: whether the pointer is still ours or
            # a complete post took it, there is nothing to write — skip the re-read (one GET
            # per batch less on the live path; benchmarks P2).
            return
        current = self.analysis_node.refresh().metadata.get("current")
        if current and current.startswith("post-") and self.analysis_node.metadata.get("status") == "complete":
            return  # a complete post result outranks live
        if not final and current == self.key:
            self._pointed_live = True
            return  # already pointing here; avoid a catalog write per batch
        self._set_pointer({"current": self.key, **self.provenance, **meta})
        self._pointed_live = not final
        if final:
            post = self._newest_complete_post()
            if post is not None:
                self._set_pointer({"current": post.item["id"], **dict(post.metadata)}, refresh=True)

    def _set_pointer(self, metadata: dict, *, refresh: bool = False) -> None:
        # update_metadata sends a JSON Patch computed against the client's cached copy: a
        # stale cache drops keys whose cached value happens to equal the new one (so a
        # "current" that another writer moved would silently not be moved back).
        if refresh:
            self.analysis_node.refresh()
        self.analysis_node.update_metadata(metadata, drop_revision=True)

    def _newest_complete_post(self):
        complete = {k: n for k, n in self.analysis_node.items()
                    if k.startswith("post-") and n.metadata.get("status") == "complete"}
        return complete[max(complete, key=lambda k: _rank(k, complete[k].metadata))] if complete else None

    def fail(self, reason: str) -> None:
        """Record a failure on the variant node (the previous ``current`` result stays)."""
        try:
            node = self._variant_node()
            node.update_metadata({"status": "failed", "error": reason[:2000], "updated": _now()}, drop_revision=True)
        except Exception as exc:  # noqa: BLE001 - never mask the original error
            log.warning("could not record failure in Tiled: %s", exc)


def read_result(analysis_node) -> dict:
    """What a reader does: follow ``current`` and load its outputs (arrays and scalars)."""
    current = analysis_node.metadata.get("current")
    if not current:
        raise KeyError(f"{analysis_node.uri} has no result yet")
    node = analysis_node[current]
    out = dict(node.metadata.get("scalars", {}))
    for key, child in node.items():
        if key != "scalars":
            out[key] = child.read()
    return out
