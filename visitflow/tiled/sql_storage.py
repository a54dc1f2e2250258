"""Tabular storage on PostgreSQL: retry Tiled's table creation when two writers race.

Two bluesky scans started together create their event tables at the same moment, and runs
of one plan have the same schema, hence the same table name (Tiled names a table by a hash
of its schema).  Tiled 0.2.20's ``SQLAdapter.init_storage`` then runs ``CREATE TABLE IF NOT
EXISTS`` on two connections at once, and PostgreSQL lets one of them fail with a unique
violation on its catalog (``pg_type``) — a 500 on the scan's ``POST`` (seen by
tests/tiled/test_tiled_postgres.py; SQLite instead serialises, then locks).  ``IF NOT
EXISTS`` does not guard against a concurrent creator; the usual remedy is to retry, since
the table then exists.  ``init_storage`` commits once at its end, so a failed attempt left
nothing behind (a sequence value may be skipped: dataset ids stay unique).

Rows in scan order on PostgreSQL.  Tiled 0.2.20's ``SQLAdapter.read`` orders a dataset's
rows by its ``order_by_args`` and ``_partition_id``, breaking ties by ``rowid`` on SQLite and
DuckDB only: on PostgreSQL the rows of one partition (TiledWriter appends every event to
partition 0) come back in an undefined order, which may differ between two reads.  A live
analysis reads ``det`` and ``motor`` as two columns, by position, so they came back paired
wrongly: four concurrent scans through blueapi once gave a b21 ``centroid`` of 0.18 for
0.29 (tests/trigger/test_blueapi_concurrent.py, CI).  :func:`install` therefore gives every
PostgreSQL table with a ``seq_num`` column (bluesky's event tables) ``order_by_args`` of
``seq_num`` ascending when its data source names none; other tables keep Tiled's order.

Hand-rolled because Tiled has no hook for either; :mod:`.tiled_compat` pins what we wrap.
"""

from __future__ import annotations

import functools
import logging
import time

__all__ = ['ATTEMPTS', 'SCAN_ORDER', 'is_creation_race', 'install']

log = logging.getLogger(__name__)

#: Attempts in all (the race needs two creators; a third covers index and sequence creation).
ATTEMPTS = 4

#: The order a bluesky event table is read in on PostgreSQL (see the module docstring).
SCAN_ORDER = [{"column": "seq_num", "direction": "asc"}]


def is_creation_race(exc: BaseException) -> bool:
    """A concurrent ``CREATE ... IF NOT EXISTS`` losing on PostgreSQL: unique violation in the
    system catalog (23505) or "already exists" (42P07 relation, 42710 object)."""
    text = str(exc)
    return "IF NOT EXISTS" in text and any(s in text for s in ("23505", "42P07", "42710", "already exists",
                                                               "pg_type_typname_nsp_index", "duplicate key"))


def install() -> bool:
    """Wrap ``SQLAdapter.init_storage`` and ``SQLAdapter.from_catalog`` once per process;
    True if this call installed them."""
    from .tiled_compat import SQLAdapter

    _install_scan_order(SQLAdapter)

    current = SQLAdapter.__dict__["init_storage"]
    original = current.__func__
    if getattr(original, "visitflow_retry", False):
        return False

    @functools.wraps(original)
    def init_storage(cls, *args, **kwargs):
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return original(cls, *args, **kwargs)
            except Exception as exc:  # adbc_driver_manager.IntegrityError / ProgrammingError
                if attempt == ATTEMPTS or not is_creation_race(exc):
                    raise
                log.info("tabular storage: concurrent table creation, retrying (%d): %s", attempt,
                         str(exc).splitlines()[0][:200])
                time.sleep(0.05 * attempt)

    init_storage.visitflow_retry = True
    SQLAdapter.init_storage = classmethod(init_storage)
    return True


def _install_scan_order(SQLAdapter) -> None:
    original = SQLAdapter.__dict__["from_catalog"].__func__
    if getattr(original, "visitflow_scan_order", False):
        return

    @functools.wraps(original)
    def from_catalog(cls, *args, **kwargs):
        adapter = original(cls, *args, **kwargs)
        if (not adapter.order_by_args and adapter.storage.dialect == "postgresql"
                and "seq_num" in adapter.structure().columns):
            adapter.order_by_args = [dict(arg) for arg in SCAN_ORDER]
        return adapter

    from_catalog.visitflow_scan_order = True
    SQLAdapter.from_catalog = classmethod(from_catalog)
