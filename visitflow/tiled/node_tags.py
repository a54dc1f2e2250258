"""What a node belongs to, recorded on the node: Tiled access tags ``visitflow:<store>:<visit>``
(a visit container) and ``visitflow:<store>:<visit>/<run>`` (a run and everything in it).

The policy computes them once, when the node is created (``init_node``, from the create
request's parent path and key — :mod:`.request_context`), and later reads them from the
node (Tiled loads a node's tags with the node) instead of re-deriving the node's ancestry
from its path on every request.  Nodes without our tag (created before tags, or by a request
whose key Tiled generated) fall back to the path.

Tiled 0.2.20 stores tags as rows of its ``access_tags`` table and refuses to attach a name
that has no row (only ``user:``/``service:`` principal tags are created on the fly), so
:class:`TagRows` inserts missing rows through the catalog's own session just before the node
is created.  Hand-rolled because Tiled's tag compiler (TagBasedAccessPolicy's YAML) defines
tags up front, and runs are not known up front.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..core.layout import Location
from ..core.scopes import valid_name
from .tiled_compat import AccessTag

__all__ = ['PREFIX', 'tag_for', 'locations_from_tags', 'TagRows']

PREFIX = "visitflow:"


def tag_for(loc: Location) -> Optional[str]:
    if loc.visit is None or not valid_name(loc.visit):
        return None
    if not loc.inside_run:
        return f"{PREFIX}{loc.store}:{loc.visit}"
    if loc.run is None or not valid_name(loc.run):
        return None
    return f"{PREFIX}{loc.store}:{loc.visit}/{loc.run}"


def locations_from_tags(tags: Iterable[str]) -> list[Location]:
    """Our tags on a node as Locations (an empty list: the node has none of ours)."""
    out = []
    for tag in tags:
        if not tag.startswith(PREFIX):
            continue
        store, _, rest = tag[len(PREFIX):].partition(":")
        visit, _, run = rest.partition("/")
        if store not in ("raw", "processed") or not valid_name(visit) or (run and not valid_name(run)):
            continue
        out.append(Location(store=store, visit=visit, run=run or None, inside_run=bool(run)))
    return out


class TagRows:
    """Create ``access_tags`` rows for our tag names (idempotent, remembered per process)."""

    def __init__(self):
        self.catalog = None  # tiled's root CatalogContainerAdapter, attached by visitflow.tiled.server
        self._known: set[str] = set()

    async def ensure(self, names: Iterable[str]) -> bool:
        """True when every name has a row (False: no catalog attached; don't tag)."""
        names = set(names) - self._known
        if not names:
            return True
        context = getattr(self.catalog, "context", None)
        if context is None:
            return False
        async with context.session() as db:
            connection = await db.connection()
            if connection.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            await connection.execute(
                insert(AccessTag.__table__).values([{"name": n, "is_public": False} for n in sorted(names)])
                .on_conflict_do_nothing(index_elements=["name"]))
            await db.commit()
        self._known |= names
        return True
