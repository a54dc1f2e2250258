"""The fencing token of a live result: ``<flow run id>/<attempt>`` (issue 21, item 7).

Shared by the writer (visitflow/flow/sink.py presents it) and Tiled's policy
(visitflow/tiled/live_fence.py checks it), so both read and write one format.  The attempt
is the flow run's ``run_count`` as Prefect's server counts it (incremented each time the run
enters Running): Prefect is the lock service, Tiled the storage that checks the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ['FENCE_HEADER', 'FENCE_KEY', 'LIVE_KEY', 'CLAIM_SUFFIX', 'Fence', 'parse_fence', 'is_claim', 'recorded_fence']

FENCE_HEADER = "x-visitflow-fence"
#: The live node's metadata key recording the attempt that owns it.
FENCE_KEY = "fence"
LIVE_KEY = "live"
#: Marks the one request that claims the live node (``<flow run id>/<attempt>;claim``): a new
#: flow run takes a live node over only by claiming it, so a cancelled run's restart by a new
#: flow run works while an old writer's ordinary writes stay refused.
CLAIM_SUFFIX = ";claim"


@dataclass(frozen=True, order=True)
class Fence:
    """One attempt of one flow run."""

    flow_run_id: str
    attempt: int

    def header(self, *, claim: bool = False) -> str:
        return f"{self.flow_run_id}/{self.attempt}" + (CLAIM_SUFFIX if claim else "")

    def metadata(self) -> dict:
        return {"flow_run_id": self.flow_run_id, "attempt": self.attempt}

    def __str__(self) -> str:
        return f"flow run {self.flow_run_id} attempt {self.attempt}"


def parse_fence(value: Optional[str]) -> Optional[Fence]:
    """``"<flow run id>/<attempt>"`` -> Fence; None for absent or malformed values."""
    if not value or "/" not in value:
        return None
    value = value.strip()
    if value.endswith(CLAIM_SUFFIX):
        value = value[:-len(CLAIM_SUFFIX)]
    run, _, attempt = value.rpartition("/")
    if not run or not attempt.isdigit() or int(attempt) < 1:
        return None
    return Fence(run, int(attempt))


def is_claim(value: Optional[str]) -> bool:
    """Whether a fence header value is a claim (``...;claim``) of a well-formed fence."""
    return bool(value) and value.strip().endswith(CLAIM_SUFFIX) and parse_fence(value) is not None


def recorded_fence(metadata) -> Optional[Fence]:
    """The fence recorded on a live node's metadata (None: unclaimed)."""
    doc = metadata.get(FENCE_KEY) if hasattr(metadata, "get") else None
    if not hasattr(doc, "get"):
        return None
    run, attempt = doc.get("flow_run_id"), doc.get("attempt")
    if not isinstance(run, str) or not isinstance(attempt, int) or isinstance(attempt, bool):
        return None
    return Fence(run, attempt)
