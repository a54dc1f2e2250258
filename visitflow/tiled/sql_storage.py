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

Hand-rolled because Tiled has no hook for it; :mod:`.tiled_compat` pins what we wrap.
"""

from __future__ import annotations

import functools
import logging
import time

__all__ = ['ATTEMPTS', 'is_creation_race', 'install']

log = logging.getLogger(__name__)

#: Attempts in all (the race needs two creators; a third covers index and sequence creation).
ATTEMPTS = 4


def is_creation_race(exc: BaseException) -> bool:
    """A concurrent ``CREATE ... IF NOT EXISTS`` losing on PostgreSQL: unique violation in the
    system catalog (23505) or "already exists" (42P07 relation, 42710 object)."""
    text = str(exc)
    return "IF NOT EXISTS" in text and any(s in text for s in ("23505", "42P07", "42710", "already exists",
                                                               "pg_type_typname_nsp_index", "duplicate key"))


def install() -> bool:
    """Wrap ``SQLAdapter.init_storage`` once per process; True if this call installed it."""
    from .tiled_compat import SQLAdapter

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
