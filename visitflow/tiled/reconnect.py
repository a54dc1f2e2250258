"""Tiled rides through a PostgreSQL restart: each pooled connection is pinged when checked out.

Tiled 0.2.20 builds its catalog's engine with ``pool_pre_ping=False`` (``tiled.catalog.adapter.
from_uri``, not configurable) and its SQL tabular storage on a bare ``sqlalchemy.pool.QueuePool``
of ADBC connections (``SQLStorage._connection_pool``), which has no dialect to ping with.  After
PostgreSQL restarts — a Pod deleted, an HA failover, a minor upgrade — every pooled connection is
dead, and the first request to use each answers **500** (``InterfaceError: connection is
closed``; measured: a plain ``tiled serve catalog`` answered one 500, then 200s, after ``pg_ctl
restart -m fast``; through ``visitflow tiled serve`` without this module, the first scan after the
restart met two 500s, a ``GET`` of the root and the ``POST`` that created its event table).
Tiled's client retries most requests on a 5xx, so that scan still completed; it does not retry
appending rows (only when the request surely never reached the server), and a 500 is an error
in the server's log either way.  Tiled's principals database and every other service here
(Prefect, the token service) already ping (``pool_pre_ping=True``).

:func:`install_storage_ping` and :func:`ping_catalog` add SQLAlchemy's documented pessimistic
disconnect handling — a ``checkout`` pool event that raises ``DisconnectionError`` when a
``SELECT 1`` fails, so the pool drops that connection and hands out a fresh one (up to three
tries) — to those two pools.  The cost is one loopback round trip per checkout, as for every
``pool_pre_ping`` engine.  A request that is *running* when PostgreSQL goes still fails: the
ping covers restarts between requests, not a database that is down.

Hand-rolled because Tiled has no option for either pool (an open Tiled pull request, #1516,
adds the storage ping upstream); :mod:`.tiled_compat` pins what we wrap.
"""

from __future__ import annotations

import functools
import logging
import weakref

__all__ = ['POSTGRES', 'install_storage_ping', 'ping_catalog']

#: the databases pinged.  Not SQLite: there is no server to lose, and a ping that meets another
#: writer's lock ("database is locked", seen in tests/flow/ on Tiled's SQLite tables) would throw
#: a good connection away and, three times over, fail the request.
POSTGRES = ("postgresql", "postgres")

log = logging.getLogger(__name__)


def _adbc_ping(dbapi_connection, connection_record, connection_proxy) -> None:
    """``checkout`` listener of a storage pool: ``SELECT 1`` on the ADBC connection, then
    ``rollback`` (ADBC opens a transaction for the select; the caller gets a clean one)."""
    from sqlalchemy.exc import DisconnectionError

    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            cursor.close()
        dbapi_connection.rollback()
    except Exception as exc:  # noqa: BLE001 -- any failure means this connection is unusable
        log.warning("tabular storage: a pooled connection failed its ping (%s); replacing it", exc)
        raise DisconnectionError(str(exc)) from exc


def install_storage_ping() -> bool:
    """Ping every pooled connection of Tiled's SQL tabular storage on PostgreSQL on checkout
    (:data:`POSTGRES`).  Once per process; True if this call installed it."""
    import sqlalchemy

    from .tiled_compat import SQLStorage

    current = SQLStorage.__dict__["_connection_pool"]
    if getattr(current.func, "visitflow_ping", False):
        return False
    original = current.func

    @functools.wraps(original)
    def _connection_pool(self):
        pool = original(self)
        if isinstance(pool, sqlalchemy.pool.QueuePool) and self.dialect in POSTGRES:
            sqlalchemy.event.listen(pool, "checkout", _adbc_ping)
        return pool

    _connection_pool.visitflow_ping = True
    wrapped = functools.cached_property(_connection_pool)
    wrapped.__set_name__(SQLStorage, "_connection_pool")   # same cache key: SQLStorage.dispose pops it
    SQLStorage._connection_pool = wrapped
    return True


def ping_catalog(root_tree) -> bool:
    """Ping the catalog engine's pooled connections on checkout (``root_tree``: the app's
    ``app.state.root_tree``) with the dialect's own ping (``Dialect.do_ping``, what
    ``pool_pre_ping=True`` runs), inside the async engine's greenlet like every checkout.
    False when the tree is not a SQL catalog or its pool is pinged already."""
    import sqlalchemy
    from sqlalchemy.exc import DisconnectionError

    engine = getattr(getattr(root_tree, "context", None), "engine", None)
    if engine is None:
        return False
    sync = getattr(engine, "sync_engine", engine)
    if sync.dialect.name not in POSTGRES or sync.pool in _PINGED:
        return False
    dialect = sync.dialect

    def _catalog_ping(dbapi_connection, connection_record, connection_proxy) -> None:
        try:
            ok = dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 -- any failure means this connection is unusable
            log.warning("catalog: a pooled connection failed its ping (%s); replacing it", exc)
            ok = False
        if not ok:
            raise DisconnectionError("catalog connection failed its ping")

    sqlalchemy.event.listen(sync.pool, "checkout", _catalog_ping)
    _PINGED.add(sync.pool)
    return True


#: catalog pools :func:`ping_catalog` has pinged (weak: a disposed engine's pool may go)
_PINGED: "weakref.WeakSet" = weakref.WeakSet()
