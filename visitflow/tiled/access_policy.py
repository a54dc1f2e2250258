"""Tiled access policy: what a node *belongs to* — (store, visit, run), recorded on the node
as a Tiled access tag when it was created — decides which of our scopes govern it.

Tiled 0.2.20 asks an async policy three things: ``allowed_scopes`` (what may the principal
do on this node), ``filters`` (which children may it see, as catalog queries) and
``init_node`` (access tags for a new node).  ``init_node`` records the node's place as our
tag (:mod:`.node_tags`: ``visitflow:raw:a1`` on a visit container, ``visitflow:raw:a1/<run>``
on a run and everything in it); ``allowed_scopes`` and ``filters`` read the tag back from the
node instead of inferring its ancestry from the request path, and a visit container's
listing is Tiled's own :class:`tiled.queries.AccessTagsFilter` over the run tags the
principal may see (Tiled applies it along the path in deep search too).  Nodes without our
tag — the root, store roots and prefix containers above the visit, nodes inside a
data-source-backed node, nodes created before tags or with a Tiled-generated key — are
placed by the layout (``raw/{visit}/{run}``, ``processed/{visit}/{run}/{analysis}``,
configurable) from their path, as before.  A node carrying a ``visitflow:`` tag we cannot
read gets nothing.  :mod:`visitflow.core.scopes` says whether the principal's scopes cover a
place.  The principal's scopes arrive as ``authn_scopes``: the authenticator puts our scope
strings next to the Tiled scopes it derived from them.

Rules (non-admin; ``visitflow:admin`` may do everything):

* root and store roots / template prefixes above the visit: visible (read:metadata only);
* a visit container: visible if any data scope touches (store, visit); listing shows only
  the runs the principal may read or write; creating a run under it needs a write scope
  covering that run (visit-wide, or ``/<run>`` for exactly that key — see
  :mod:`.request_context`); nobody but admin edits the visit container itself;
* a run container and everything below it: read/write as the scopes allow; writing implies
  reading (a writer must be able to find what it writes); deleting only in processed runs
  (analyses replace their outputs; raw data is only ever added to);
* inside a processed run, a write scope naming an analysis
  (``write:processed:<visit>/<run>/<analysis>``, what data tokens carry) writes only that
  analysis's node and below; on the run container it may only create that node;
* a raw run is append-only (:mod:`.raw_runs`): only the principal that created it writes to
  it, only until its stop document; others with raw write scopes read (a 403 says why);
* a processed analysis's ``live`` node is fenced (:mod:`.live_fence`): once an attempt of a
  live flow run has claimed it, only that attempt writes it and below (409 with the reason
  for an older attempt, another flow run or a write without the fence);
* ``register`` (pointing a node at detector files) inside a run the principal may write,
  only in stores with a configured data directory (``file_roots``), and only when every
  file lies in *that visit's* directory (:mod:`.file_roots`); a registration that fails
  that check is refused with a 403 naming the file — for admin too;
* anything the layout does not place, or a node whose path cannot be known: admin only.

Listings above the visit level are filtered with :class:`DirectChildren`, a query that also
restricts *deep* search (``/search-deep``) to direct children, because Tiled applies only the
search root's conditions to descendants — a plain key filter would leak deeper nodes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from fastapi import HTTPException
from tiled.access_control.access_policies import NO_ACCESS
from tiled.access_control.protocols import AccessPolicy, normalize_access_tags
from tiled.access_control.scopes import ALL_SCOPES
from tiled.queries import AccessTagsFilter

from ..core.fence import LIVE_KEY, is_claim, parse_fence
from ..core.layout import DEFAULT_PROCESSED_TEMPLATE, DEFAULT_RAW_TEMPLATE, Layout, Location
from ..core.scopes import OpaqueScope, ScopeSet, valid_name
from .authenticator import ADMIN_SCOPE, DELETE_SCOPES, READ_SCOPES, WRITE_SCOPES
from . import facility_users, live_fence, node_tags, raw_runs
from .file_roots import FileRoots
from .request_context import CREATE_ROUTES, REQUEST, RequestInfo
from .tiled_compat import CatalogNodeAdapter, Node

__all__ = [
    'META', 'NONE', 'ADMIN_WITHOUT_REGISTER', '_LAST_PLACE', 'Place', 'DirectChildren',
    'VisitflowAccessPolicy',
]

logger = logging.getLogger(__name__)

META = frozenset({"read:metadata"})
NONE: frozenset[str] = frozenset()
ADMIN_WITHOUT_REGISTER = frozenset(ALL_SCOPES) - {"register"}
_PROBE = "\x00probe"  # a segment no real key can be, to ask a template what comes next
#: Tiled scopes that change a node (what the append-only rule for raw runs withholds).
_CHANGES = WRITE_SCOPES | DELETE_SCOPES | frozenset({"register"})


@dataclass(frozen=True)
class Place:
    """Where a node is: its path (to match a request to the node) and what it belongs to —
    from its tags when ``tagged``, else from the layout applied to the path."""

    path: tuple[str, ...]
    locations: tuple[Location, ...]
    tagged: bool = False


#: Place of the last catalog node evaluated in this request (see ``place``).
_LAST_PLACE: ContextVar[Optional[Place]] = ContextVar("visitflow_last_place", default=None)


@dataclass
class DirectChildren:
    """Server-side query: children of ``parent_id`` (with ``key`` in ``keys`` unless None).

    Not registered for clients (no name in tiled.queries), only with the catalog adapter.
    """

    parent_id: int
    keys: Optional[list[str]] = None


def _direct_children(query: DirectChildren, tree):
    condition = Node.parent == query.parent_id
    if query.keys is not None:
        condition = condition & Node.key.in_(query.keys)
    return tree.new_variation(conditions=tree.conditions + [condition])


CatalogNodeAdapter.register_query(DirectChildren, _direct_children)


@lru_cache(maxsize=4096)
def _parse(scopes: frozenset) -> ScopeSet:
    return ScopeSet.lenient(scopes)


class VisitflowAccessPolicy(AccessPolicy):
    """Config (tiled ``access_control.args``): ``raw_template``, ``processed_template``
    (``null``/empty for a server holding only one store), ``admin_scope``, ``file_roots``
    (``{store: "/data/{visit}"}``: where that store's detector files may be registered),
    ``authority`` (``{kind: opa, url, cache_seconds}``: decides for facility users' own
    tokens, see :mod:`.facility_users`; without it such tokens get nothing)."""

    def __init__(self, raw_template: Optional[str] = DEFAULT_RAW_TEMPLATE,
                 processed_template: Optional[str] = DEFAULT_PROCESSED_TEMPLATE,
                 admin_scope: str = ADMIN_SCOPE, path_cache_size: int = 65536,
                 file_roots: Optional[dict] = None, authority: Optional[dict] = None):
        from ..core.authority import authority_from_config

        self.authority = authority_from_config(authority) if authority else None
        self.layout = Layout.from_templates(raw_template or None, processed_template or None)
        self.file_roots = FileRoots(file_roots, self.layout)
        self.admin_scope = admin_scope
        self.tag_rows = node_tags.TagRows()
        self.frozen_runs = raw_runs.FrozenRuns()
        self.live_nodes = live_fence.LiveNodes()
        self._path_cache: OrderedDict = OrderedDict()
        self._path_cache_size = path_cache_size

    # -- helpers ------------------------------------------------------------------------
    def scopes_of(self, authn_scopes) -> ScopeSet:
        return _parse(frozenset(authn_scopes or ()))

    def is_admin(self, scopes: ScopeSet) -> bool:
        return scopes.covers(OpaqueScope(self.admin_scope))

    async def _effective_scopes(self, principal, authn_scopes, place: Place, *, listing: bool) -> ScopeSet:
        """A run token's own scopes; for a facility user, the authority's answer as scopes."""
        if not facility_users.is_facility_user(authn_scopes):
            return self.scopes_of(authn_scopes)
        if self.authority is None:
            return ScopeSet()
        locations = [loc for loc in place.locations if loc.visit is None or self._names_ok(loc)]
        return await facility_users.scopes_for(self.authority, principal, locations, listing=listing,
                                               authn_scopes=authn_scopes)

    def place_of(self, path: tuple[str, ...], tags) -> Optional[Place]:
        """The node's place: its tags if it carries ours, else the layout's reading of its
        path (None: it carries a ``visitflow:`` tag that is not a place — nothing allowed)."""
        tags = list(tags or ())
        tagged = node_tags.locations_from_tags(tags)
        if tagged:
            return Place(tuple(path), tuple(tagged), True)
        if any(t.startswith(node_tags.PREFIX) for t in tags):
            return None
        return Place(tuple(path), tuple(loc for _t, loc in self._locations(tuple(path))))

    async def place(self, node) -> Optional[Place]:
        """:meth:`place_of` the node (tags read from the node, path from the catalog).

        Nodes *inside* a data-source-backed node (a table's columns, groups of a registered
        HDF5 file) are plain adapters with neither tags nor a path.  Tiled reaches them only
        by walking from the root, filtering every catalog node on the way, so the last
        catalog node this request evaluated is their ancestor; its place is remembered in a
        context variable (one per request task) and used if it lies inside a run.
        """
        if getattr(node, "node", None) is None or getattr(node, "path_segments", None) is None:
            last = _LAST_PLACE.get()
            if last is not None and any(loc.inside_run for loc in last.locations):
                return last
            return None
        path = await self.node_path(node)
        if path is None:
            return None
        place = self.place_of(path, getattr(node, "access_tags", None) or ())
        _LAST_PLACE.set(place)
        return place

    async def node_path(self, node) -> Optional[tuple[str, ...]]:
        """A catalog node's path from the root (None when it cannot be known).

        Cached by (id, parent, key, creation time): SQLite may reuse the id of a deleted
        node, so the id alone could map a new node onto an old node's path.
        """
        orm_node = getattr(node, "node", None)
        get_segments = getattr(node, "path_segments", None)
        if orm_node is None or get_segments is None:
            return None
        if getattr(orm_node, "id", None) == 0 and getattr(orm_node, "parent", 1) is None:
            return ()
        cache_key = (orm_node.id, orm_node.parent, orm_node.key, getattr(orm_node, "time_created", None))
        path = self._path_cache.get(cache_key)
        if path is None:
            path = tuple(await get_segments())
            self._path_cache[cache_key] = path
            if len(self._path_cache) > self._path_cache_size:
                self._path_cache.popitem(last=False)
        return path

    def new_node_tags(self, request: Optional[RequestInfo]) -> list[str]:
        """Our tags for the node a create request makes (none if its key is not known)."""
        if request is None or request.method != "POST" or request.route not in CREATE_ROUTES:
            return []
        if request.new_key is None or not valid_name(request.new_key):
            return []
        locs = [loc for _t, loc in self._locations(request.path + (request.new_key,))]
        return sorted({t for t in map(node_tags.tag_for, locs) if t})

    def _locations(self, path: tuple[str, ...]) -> list[tuple[object, Location]]:
        out = []
        for template in self.layout.templates():
            loc = template.match(path)
            if loc is not None:
                out.append((template, loc))
        return out

    def _analysis_at(self, path: tuple[str, ...], store: str) -> Optional[str]:
        """The analysis a node of ``store`` lies in, from its path (the place tags name the run only)."""
        for template, loc in self._locations(path):
            if template.store == store and loc.analysis is not None:
                return loc.analysis
        return None

    @staticmethod
    def _names_ok(loc: Location) -> bool:
        return valid_name(loc.visit) and (loc.run is None or valid_name(loc.run))

    # -- pure decisions (unit-testable) -------------------------------------------------
    def scopes_at(self, path: tuple[str, ...], scopes: ScopeSet,
                  request: Optional[RequestInfo], tags=()) -> frozenset[str]:
        """Tiled scopes a (non-admin) principal holds on the node at ``path`` (with ``tags``)."""
        place = self.place_of(path, tags)
        return NONE if place is None else self.scopes_in(place, scopes, request)

    def scopes_in(self, place: Place, scopes: ScopeSet, request: Optional[RequestInfo]) -> frozenset[str]:
        """Tiled scopes a (non-admin) principal holds on a node at ``place``."""
        path = place.path
        if not path and not place.tagged:
            return META
        result: set[str] = set()
        for loc in place.locations:
            if loc.visit is None:  # a store root or a prefix above the visit
                result |= META
                continue
            if not self._names_ok(loc):
                continue
            store, visit = loc.store, loc.visit
            if not loc.inside_run:  # the visit container
                if scopes.touches(store, visit):
                    result |= META
                if scopes.allows("read", store, visit):
                    result |= READ_SCOPES
                if request is None:
                    # No request context (plain `tiled serve`): fail closed to visit-wide writers.
                    if scopes.allows("write", store, visit):
                        result |= META | {"write:metadata", "create:node"}
                elif request.creates_child_of(path):
                    key = request.new_key
                    run = key if key is not None and valid_name(key) else None
                    # a run's container: for whoever may write some part of that run (e.g. one
                    # analysis's results); a key Tiled generates: visit-wide writers only
                    if (scopes.allows_some("write", store, visit, run) if run is not None
                            else key is None and scopes.allows("write", store, visit)):
                        result |= META | {"write:metadata", "create:node"}
                continue
            if scopes.allows("read", store, visit, loc.run):
                result |= READ_SCOPES
            analysis = loc.analysis if loc.analysis is not None else self._analysis_at(path, store)
            if store == "processed" and analysis is None and not scopes.allows("write", store, visit, loc.run):
                # The processed run container, for a token that writes one analysis of it: it may
                # see the container and create its own analysis's node in it, nothing else.
                if scopes.allows_some("write", store, visit, loc.run):
                    result |= READ_SCOPES
                    key = request.new_key if request is not None and request.creates_child_of(path) else None
                    if key is not None and valid_name(key) and scopes.allows("write", store, visit, loc.run, key):
                        result |= {"write:metadata", "create:node"}
                continue
            if scopes.allows("write", store, visit, loc.run, analysis):
                result |= READ_SCOPES | WRITE_SCOPES
                if store == "processed":   # outputs get replaced; raw is append-only
                    result |= DELETE_SCOPES
                if store in self.file_roots.stores and request is not None:
                    result.add("register")  # the files themselves are checked in registration_refusal
        return frozenset(result)

    def registration_refusal(self, request: Optional[RequestInfo]) -> Optional[str]:
        """Why this request's file registration is refused (None: not one, or fine)."""
        if request is None or not request.registers_files:
            return None
        if request.asset_uris is None:
            return "could not read the registration body (JSON under 16 MiB expected)"
        if not self.file_roots:
            return "this server registers no external files" if request.asset_uris else None
        return self.file_roots.refusal(request.registered_node_path, request.asset_uris)

    @staticmethod
    def visible_tags(place: Place, scopes: ScopeSet) -> Optional[list[str]]:
        """Below a tagged node: the run tags whose nodes the principal may see (None: all)."""
        tags: set[str] = set()
        for loc in place.locations:
            if loc.inside_run:
                return None
            if not scopes.touches(loc.store, loc.visit):
                continue
            readable = scopes.runs(loc.store, loc.visit, "read")
            writable = scopes.runs(loc.store, loc.visit, "write")
            if readable is None or writable is None:
                return None
            for run in readable | writable:
                tag = node_tags.tag_for(Location(store=loc.store, visit=loc.visit, run=run, inside_run=True))
                if tag:
                    tags.add(tag)
        return sorted(tags)

    def visible_children(self, path: tuple[str, ...], scopes: ScopeSet) -> tuple[bool, Optional[set[str]]]:
        """Untagged nodes: (whole subtree visible?, keys of visible children or None for all)."""
        keys: set[str] = set()
        all_children = False
        for template, loc in self._locations(path):
            if loc.inside_run:
                return True, None
            if loc.visit is not None:  # visit container: the runs it may read or write
                if not self._names_ok(loc) or not scopes.touches(loc.store, loc.visit):
                    continue
                readable = scopes.runs(loc.store, loc.visit, "read")
                writable = scopes.runs(loc.store, loc.visit, "write")
                if readable is None or writable is None:
                    return True, None
                keys |= readable | writable
                continue
            nxt = template.match(list(path) + [_PROBE])
            if nxt is None:  # next template segment is a literal
                keys.add(template.segments[len(path)])
            elif nxt.visit == _PROBE:
                keys |= scopes.visits(template.store)
            else:  # another placeholder above the visit ({instrument}, {proposal}...)
                all_children = True
        return False, (None if all_children else keys)

    # -- tiled protocol -------------------------------------------------------------------
    async def init_node(self, principal, authn_access_tags, authn_scopes, access_tags=None):
        """Record (store, visit, run) on the new node as our tags (:mod:`.node_tags`);
        tags a client asks for are ignored — where a node lives decides who may see it."""
        tags = self.new_node_tags(REQUEST.get())
        if any(loc.store == "raw" and loc.inside_run for loc in node_tags.locations_from_tags(tags)):
            writer = raw_runs.writer_tag(principal)   # who makes a raw run (or adds to it) writes it
            if writer:
                tags = sorted(set(tags) | {writer})
        if tags and not await self.tag_rows.ensure(tags):
            tags = []
        return (bool(access_tags) or bool(tags), normalize_access_tags(tags))

    async def modify_node(self, node, principal, authn_access_tags, authn_scopes, access_tags):
        """A node's tags say where it was created; nobody changes them (e.g. TiledWriter's
        metadata update at the stop document keeps them)."""
        current = normalize_access_tags(getattr(node, "access_tags", None) or ())
        return (access_tags is not None and normalize_access_tags(access_tags) != current, current)

    async def allowed_scopes(self, node, principal, authn_access_tags, authn_scopes):
        if principal is None:
            return NONE
        request = REQUEST.get()
        refusal = self.registration_refusal(request)
        if refusal is not None:
            # After authentication (principal is known), before Tiled touches the catalog.
            raise HTTPException(status_code=403, detail=f"registration refused: {refusal}")
        scopes = self.scopes_of(authn_scopes)
        if self.is_admin(scopes):
            # Without the request middleware registrations cannot be checked: nobody registers.
            return ALL_SCOPES if request is not None else ADMIN_WITHOUT_REGISTER
        place = await self.place(node)
        if place is None:
            return NONE
        scopes = await self._effective_scopes(principal, authn_scopes, place, listing=False)
        result = self.scopes_in(place, scopes, request)
        if result & _CHANGES and any(loc.store == "raw" and loc.inside_run for loc in place.locations):
            result = await self._append_only(node, principal, place, result, request)
        if result & _CHANGES and request is not None and request.writes and request.target == place.path \
                and any(loc.store == "processed" and loc.inside_run for loc in place.locations):
            await self._fence_check(node, place.path, request)
        return result

    def _analysis_path(self, path: tuple[str, ...]) -> Optional[tuple[str, ...]]:
        """The path of the processed analysis node ``path`` lies in (None: above one)."""
        for i in range(1, len(path) + 1):
            if self._analysis_at(path[:i], "processed") is not None:
                return path[:i]
        return None

    async def _fence_check(self, node, path: tuple[str, ...], request: RequestInfo) -> None:
        """:mod:`.live_fence`: a write into a live node (or a fenced writer's write to its
        analysis node) by an attempt that does not own it is a 409 with the reason."""
        analysis_path = self._analysis_path(path)
        if analysis_path is None:
            return
        live_path = analysis_path + (LIVE_KEY,)
        inside_live = path[:len(live_path)] == live_path
        presented = parse_fence(request.fence)
        malformed = request.fence is not None and presented is None
        if not inside_live and request.fence is None:
            return   # the analysis node, written by a post run (no fence): not live's business
        recorded = await self.live_nodes.fence_at(live_path, node if path == live_path else None)
        reason = live_fence.refusal(recorded, presented, "/".join(live_path), inside_live=inside_live,
                                    malformed=malformed, claim=is_claim(request.fence))
        if presented is not None:
            live_fence.DECISIONS.labels(live_fence.attempt_label(presented.attempt),
                                         "refused" if reason else "allowed").inc()
        if reason is not None:
            logger.warning("%s %s refused: %s", request.method, "/".join(path), reason)
            raise HTTPException(status_code=409, detail=reason)

    def _run_path(self, path: tuple[str, ...]) -> Optional[tuple[str, ...]]:
        """The path of the raw run container ``path`` lies in (None: not known)."""
        for i in range(1, len(path) + 1):
            if any(loc.store == "raw" and loc.inside_run for _t, loc in self._locations(path[:i])):
                return path[:i]
        return None

    async def _append_only(self, node, principal, place: Place, result: frozenset[str],
                           request: Optional[RequestInfo]) -> frozenset[str]:
        """:mod:`.raw_runs`: inside a raw run, writes only for its writer while it is open.
        A write aimed at this node that the rule refuses is a 403 with the reason."""
        read_only = result - _CHANGES
        targeted = request is not None and request.writes and request.target == place.path
        if not targeted:
            return read_only            # nothing here needs more (an ancestor, a read)
        tags = getattr(node, "access_tags", None) or ()
        run_path = self._run_path(place.path)
        if run_path is None or getattr(node, "node", None) is None:
            raise HTTPException(status_code=403, detail="raw data is append-only: this node cannot be written")
        writer = raw_runs.is_writer(principal, tags)
        # Ending the live stream of a finished run (TiledWriter does, after its stop update)
        # changes no data: the writer may do it on a frozen run too.
        closes_stream = request.route == "stream" and request.method == "DELETE"
        frozen = writer and not closes_stream and await self.frozen_runs.frozen(
            run_path, node if run_path == place.path else None)
        reason = raw_runs.refusal(run_path, writer=writer, recorded=bool(raw_runs.writers(tags)), frozen=frozen)
        if reason is not None:
            raise HTTPException(status_code=403, detail=reason)
        return result

    async def filters(self, node, principal, authn_access_tags, authn_scopes, scopes):
        if principal is None:
            return NO_ACCESS
        ours = self.scopes_of(authn_scopes)
        if self.is_admin(ours):
            return []
        place = await self.place(node)
        if place is None:
            return NO_ACCESS
        ours = await self._effective_scopes(principal, authn_scopes, place, listing=True)
        if place.tagged:
            tags = self.visible_tags(place, ours)
            return [] if tags is None else [AccessTagsFilter(tags)]
        whole, keys = self.visible_children(place.path, ours)
        if whole:
            return []
        return [DirectChildren(node.node.id, None if keys is None else sorted(keys))]
