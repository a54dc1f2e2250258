"""Raw data is append-only: only a raw run's writer may add to it while it is open; after its
stop document it is frozen; everyone else with a raw scope only reads (issue 20, finding 5:
a visit member with ``write:raw:a1`` overwrote another user's raw array and run metadata).

*The writer* is the principal that created the run container — blueapi's TiledWriter, with
the user's own token (pass-through) or blueapi's service identity (ServiceAccount): the rule
names no mode, it records who made the run.  :func:`writer_tag` is recorded on the run
container and on every node created inside it (``init_node``), as a Tiled access tag
``visitflow-writer:<principal uuid>`` beside the place tag of :mod:`.node_tags`.  Since only
the writer may create inside an open run, every node of the run carries the same writer.

*Open* means the run container's metadata has no ``stop`` key yet.  TiledWriter's last write
is exactly the update that adds it (``update_metadata({"stop": doc, ...})``), so its stop-
document update, descriptor updates, appends and external-file registrations all happen
while the run is open.  A run seen frozen is remembered (it never reopens).

Nodes of a raw run with no writer tag (runs written before this rule) are frozen: nobody but
the admin writes to them.  The admin (``visitflow:admin``) is not bound by these rules (it
repairs).  Decisions only: :class:`~.access_policy.VisitflowAccessPolicy` applies them.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ['WRITER_PREFIX', 'FrozenRuns', 'is_writer', 'refusal', 'writer_tag', 'writers']

WRITER_PREFIX = "visitflow-writer:"


def writer_tag(principal) -> Optional[str]:
    """The tag naming ``principal`` as a run's writer (None: a principal without a uuid)."""
    uuid = getattr(principal, "uuid", None)
    return f"{WRITER_PREFIX}{uuid.hex}" if uuid is not None else None


def writers(tags: Iterable[str]) -> set[str]:
    return {t for t in tags or () if t.startswith(WRITER_PREFIX)}


def is_writer(principal, tags: Iterable[str]) -> bool:
    tag = writer_tag(principal)
    return tag is not None and tag in writers(tags)


def refusal(run_path: tuple[str, ...], *, writer: bool, recorded: bool, frozen: bool) -> Optional[str]:
    """Why a write into this raw run is refused (None: the writer, run open)."""
    where = "/".join(run_path)
    if not recorded:
        return f"raw data is append-only: {where} has no recorded writer (written before the rule), so it is frozen"
    if not writer:
        return f"raw data is append-only: only the writer of {where} may add to it; visit members read"
    if frozen:
        return f"raw data is append-only: {where} is closed (its stop document was written) and frozen"
    return None


class FrozenRuns:
    """Whether a raw run container has its stop document, looked up through the catalog
    (only for a write by the writer); frozen runs remembered."""

    def __init__(self, max_entries: int = 65536):
        self.catalog = None   # tiled's root catalog adapter, attached by visitflow.tiled.server
        self._frozen: set[tuple[str, ...]] = set()
        self.max_entries = max_entries

    async def frozen(self, run_path: tuple[str, ...], run_node=None) -> bool:
        """``run_node``: the run container itself, when the request targets it (no lookup)."""
        if run_path in self._frozen:
            return True
        node = run_node
        if node is None:
            if self.catalog is None:
                return True   # cannot know: fail closed
            node = await self.catalog.lookup_adapter(list(run_path))
            if node is None:
                return True
        metadata = node.metadata() if callable(getattr(node, "metadata", None)) else None
        stopped = not isinstance(metadata, dict) or metadata.get("stop") is not None
        if stopped:
            if len(self._frozen) >= self.max_entries:
                self._frozen.clear()
            self._frozen.add(run_path)
        return stopped
