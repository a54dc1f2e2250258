"""Fencing of live results: a rescheduled live run's old attempt cannot write again.

Why: the heartbeat automation (visitflow/production/ha_recovery.py) moves a live flow run
back to Scheduled when its heartbeats stop for 75 s, and another worker starts it again —
the same flow run, ``run_count`` one higher.  A host that was only *cut off* (not dead)
still runs the old attempt; when its link returns it would carry on writing the same
``live`` node as the new attempt (two writers, one result).  A client-side check cannot
prevent that (the old attempt learns nothing while it is cut off), so the decision is the
server's, at write time — the classic fencing token:

* the token is ``<flow run id>/<attempt>``, attempt = the flow run's ``run_count``, which
  Prefect's server increments each time the run enters Running (Prefect is the lock
  service; attempts of one flow run are totally ordered);
* a writer presents it in the ``X-Visitflow-Fence`` header on every request;
* a live attempt *claims* the ``live`` node before reading its checkpoint: one metadata
  update writing ``fence: {flow_run_id, attempt}`` on it;
* the access policy (:meth:`~.access_policy.VisitflowAccessPolicy.allowed_scopes`) reads the
  recorded fence from the live node and refuses (409, with the reason) a write into the
  live node, or below it, by an older attempt, by another flow run, or without a fence;
  a fenced writer's writes to the analysis node (the ``current`` pointer) are refused too
  when its attempt is older;
* check and write are one step: :class:`FenceLocks` (used by the request middleware)
  serializes the write requests carrying one flow run's fence, so a claim cannot land
  between an old attempt's check and its write.

Limits (stated, not hidden): the locks are per Tiled process — one Tiled replica per
catalog, as deployed here; several replicas would need the lock in the catalog's database
(a PostgreSQL advisory lock).  The header is the writer's own statement; it guards against
stale writers, not against a malicious holder of the same data token (that token could
write anyway).  Post results are versioned children (``post-<id8>``, visitflow/flow/sink.py) and
need no fence.  Pure decisions here; the policy and middleware apply them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from prometheus_client import Counter

from ..core.fence import FENCE_HEADER, Fence, recorded_fence

__all__ = ['refusal', 'attempt_label', 'FenceLocks', 'LiveNodes', 'DECISIONS']

log = logging.getLogger(__name__)

#: Fenced writes by attempt and outcome (``allowed`` / ``refused``); on Tiled's ``/metrics``.
DECISIONS = Counter("visitflow_tiled_live_fence", "Writes to a live result checked against its fence",
                    ["attempt", "outcome"])


def attempt_label(attempt: int) -> str:
    """The metric's ``attempt`` label: the number up to 20, then ``>20`` (the header is the
    client's: a bounded label set whatever it sends)."""
    return str(attempt) if attempt <= 20 else ">20"


def refusal(recorded: Optional[Fence], presented: Optional[Fence], where: str, *, inside_live: bool,
            malformed: bool = False, claim: bool = False) -> Optional[str]:
    """Why this write is refused (None: allowed).

    ``inside_live``: the write targets the live node or a node below it (strict: the owner
    only); otherwise it targets the analysis node (only a *superseded* fenced writer is
    refused there — post writers present no fence and are not live's business).
    ``claim``: the request is a claim (``<fence>;claim``, sent once when an attempt starts).
    Another flow run may take the node over by a claim -- a live analysis cancelled or
    crashed and started again as a new flow run resumes from its checkpoint -- and from then
    on the old flow run's writes are refused; within one flow run, attempts are ordered and
    an older attempt's claim is refused like its other writes.
    """
    if malformed:
        return f"live fence: the {FENCE_HEADER} header must be '<flow run id>/<attempt>'"
    if recorded is None:
        return None   # unclaimed: the first attempt's claim records its fence
    if presented is None:
        if not inside_live:
            return None
        return (f"live fence: {where} is owned by {recorded}; a write must present its fence "
                f"({FENCE_HEADER}: <flow run id>/<attempt>)")
    if presented.flow_run_id != recorded.flow_run_id:
        if not inside_live or claim:
            return None   # a new flow run's claim takes the node over
        return (f"live fence: {where} is owned by flow run {recorded.flow_run_id}, not {presented.flow_run_id} "
                "(a flow run takes a live node over only by claiming it when it starts)")
    if presented.attempt < recorded.attempt:
        return (f"live fence: {presented} was superseded by attempt {recorded.attempt} (the run was "
                f"rescheduled while this attempt was unreachable); it must stop writing {where}")
    return None


class FenceLocks:
    """One asyncio lock per flow run, held for each write request carrying its fence: the
    policy's check of the recorded fence and the write it allows happen without a claim by
    another attempt in between.  Locks of idle flow runs are dropped."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def run(self, flow_run_id: str, call):
        lock, users = self._locks.setdefault(flow_run_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await call()
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._locks.pop(flow_run_id, None)

    def __len__(self) -> int:
        return len(self._locks)


class LiveNodes:
    """The recorded fence of a live node, read through the catalog at each fenced write
    (never cached: a claim must be seen by the next write)."""

    def __init__(self):
        self.catalog = None   # tiled's root catalog adapter, attached by visitflow.tiled.server

    async def fence_at(self, path: tuple[str, ...], node=None) -> Optional[Fence]:
        """``node``: the live node itself when the request targets it (no lookup)."""
        if node is None:
            if self.catalog is None:
                return None
            from .tiled_compat import NoEntry

            try:
                node = await self.catalog.lookup_adapter(list(path))
            except NoEntry:
                return None   # no live node yet: unclaimed
            if node is None:
                return None
        metadata = node.metadata() if callable(getattr(node, "metadata", None)) else getattr(node, "metadata", None)
        return recorded_fence(metadata)
