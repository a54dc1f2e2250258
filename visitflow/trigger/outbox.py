"""The trigger's durable outbox: what still has to be sent to the IdP and Prefect.

A SQLite file under the trigger's state directory, so a Prefect outage (or a blueapi
restart) loses nothing: requests wait here and are retried with backoff.  Two tables:

``grants``   one row per (analysis, visit, run): the delegation grant once exchanged, and
             whether it is stored in Prefect yet.  The grant is on disk (file mode 0600)
             only while Prefect is unreachable; it is aud-bound to ``visitflow``, useless
             without the visitflow client secret, and expires.  The *user's* token is never
             written here — it stays in memory.
``requests`` one row per flow run to create (analysis, variant, visit, run), keyed by the
             same idempotency key Prefect gets, so a duplicated document or a retried send
             yields exactly one flow run.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ['SCHEMA', 'Grant', 'Request', 'Outbox']

SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    analysis TEXT, visit TEXT, run TEXT,
    state TEXT NOT NULL,            -- exchange | store | ready | refused | failed
    token TEXT,
    error TEXT,
    attempts INTEGER DEFAULT 0,
    next_at REAL DEFAULT 0,
    created REAL, updated REAL,
    options TEXT,                   -- the plan's option values (canonical JSON), or NULL
    instrument TEXT,                -- the start document's instrument (beamline), or NULL
    PRIMARY KEY (analysis, visit, run)
);
CREATE TABLE IF NOT EXISTS requests (
    key TEXT PRIMARY KEY,           -- analysis/variant/visit/run (the idempotency key)
    analysis TEXT, variant TEXT, visit TEXT, run TEXT,
    state TEXT NOT NULL,            -- pending | done | refused | report (a failure to record in
                                    -- Prefect: visitflow/trigger/outage.py) | failed
    flow_run_id TEXT,
    error TEXT,
    attempts INTEGER DEFAULT 0,
    next_at REAL DEFAULT 0,
    created REAL, updated REAL
);
"""


@dataclass
class Grant:
    analysis: str
    visit: str
    run: str
    state: str
    token: str | None
    attempts: int
    options: str | None = None      # canonical JSON of the plan's option values
    error: str | None = None        # why the last attempt failed
    created: float | None = None    # when the start document queued it
    instrument: str | None = None   # the beamline the run came from (start document ``instrument``)

    @property
    def option_values(self) -> dict:
        import json

        return json.loads(self.options) if self.options else {}


@dataclass
class Request:
    key: str
    analysis: str
    variant: str
    visit: str
    run: str
    state: str
    attempts: int
    flow_run_id: str | None = None
    error: str | None = None


_GRANT_COLUMNS = "analysis, visit, run, state, token, attempts, options, error, created, instrument"
_REQUEST_COLUMNS = "key, analysis, variant, visit, run, state, attempts, flow_run_id, error"


class Outbox:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if fresh:
            os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(grants)")}
        if "options" not in columns:
            self._db.execute("ALTER TABLE grants ADD COLUMN options TEXT")  # an outbox from before options
        if "instrument" not in columns:
            self._db.execute("ALTER TABLE grants ADD COLUMN instrument TEXT")  # ... from before beamlines

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _insert(self, sql: str, args) -> bool:
        """True if a row was inserted (False: it was already there — a duplicate document)."""
        with self._lock:
            return self._db.execute(sql, args).rowcount == 1

    # ---------------------------------------------------------------- enqueue (RunEngine thread)
    def add_grant(self, analysis: str, visit: str, run: str, options: str | None = None,
                  instrument: str | None = None) -> bool:
        now = time.time()
        return self._insert(
            "INSERT OR IGNORE INTO grants (analysis, visit, run, state, created, updated, options, instrument) "
            "VALUES (?, ?, ?, 'exchange', ?, ?, ?, ?)", (analysis, visit, run, now, now, options, instrument))

    def add_request(self, key: str, analysis: str, variant: str, visit: str, run: str) -> bool:
        now = time.time()
        return self._insert(
            "INSERT OR IGNORE INTO requests (key, analysis, variant, visit, run, state, created, updated) "
            "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)", (key, analysis, variant, visit, run, now, now))

    # ---------------------------------------------------------------- sender thread
    def due_grants(self, state: str) -> list[Grant]:
        rows = self._exec(f"SELECT {_GRANT_COLUMNS} FROM grants "
                          "WHERE state = ? AND next_at <= ? ORDER BY created", (state, time.time()))
        return [Grant(*r) for r in rows]

    def grant(self, analysis: str, visit: str, run: str) -> Grant | None:
        rows = self._exec(f"SELECT {_GRANT_COLUMNS} FROM grants "
                          "WHERE analysis = ? AND visit = ? AND run = ?", (analysis, visit, run))
        return Grant(*rows[0]) if rows else None

    def set_grant(self, g: Grant, *, state: str, token: str | None = None, error: str | None = None,
                  retry_in: float | None = None) -> None:
        self._exec(
            "UPDATE grants SET state = ?, token = COALESCE(?, token), error = ?, attempts = attempts + ?, "
            "next_at = ?, updated = ? WHERE analysis = ? AND visit = ? AND run = ?",
            (state, token, error, 1 if retry_in is not None else 0, time.time() + (retry_in or 0), time.time(),
             g.analysis, g.visit, g.run))
        if state == "ready":  # stored in Prefect: no need to keep the token on disk
            self._exec("UPDATE grants SET token = NULL WHERE analysis = ? AND visit = ? AND run = ?",
                       (g.analysis, g.visit, g.run))

    def reset_grant(self, analysis: str, visit: str, run: str, options: str | None = None,
                    instrument: str | None = None) -> None:
        """Exchange again (a by-hand re-run brings a new user token; the old grant may be gone).
        A by-hand re-run that names no instrument keeps the one the start document gave."""
        if not self.add_grant(analysis, visit, run, options, instrument):
            self._exec("UPDATE grants SET state = 'exchange', token = NULL, error = NULL, attempts = 0, "
                       "next_at = 0, options = ?, instrument = COALESCE(?, instrument), created = ?, updated = ? "
                       "WHERE analysis = ? AND visit = ? AND run = ?",
                       (options, instrument, time.time(), time.time(), analysis, visit, run))

    def exchanges_pending(self, run: str) -> int:
        """How many of ``run``'s grants still wait for their exchange at the IdP."""
        return self._exec("SELECT COUNT(*) FROM grants WHERE run = ? AND state = 'exchange'", (run,))[0][0]

    def requests_for(self, analysis: str, visit: str, run: str, state: str | None = None) -> list[Request]:
        rows = self._exec(f"SELECT {_REQUEST_COLUMNS} FROM requests "
                          "WHERE analysis = ? AND visit = ? AND run = ? AND (? IS NULL OR state = ?) ORDER BY created",
                          (analysis, visit, run, state, state))
        return [Request(*r) for r in rows]

    def due_requests(self, state: str = "pending") -> list[Request]:
        """Requests in ``state`` (``pending``: flow runs to create; ``report``: failures to
        record) whose retry time has come."""
        rows = self._exec(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE state = ? AND next_at <= ? "
                          "ORDER BY created", (state, time.time()))
        return [Request(*r) for r in rows]

    def set_request(self, key: str, *, state: str, flow_run_id: str | None = None, error: str | None = None,
                    retry_in: float | None = None) -> None:
        self._exec(
            "UPDATE requests SET state = ?, flow_run_id = COALESCE(?, flow_run_id), error = ?, "
            "attempts = attempts + ?, next_at = ?, updated = ? WHERE key = ?",
            (state, flow_run_id, error, 1 if retry_in is not None else 0, time.time() + (retry_in or 0),
             time.time(), key))

    def requests(self, state: str | None = None) -> list[Request]:
        sql = f"SELECT {_REQUEST_COLUMNS} FROM requests"
        rows = self._exec(sql + (" WHERE state = ?" if state else "") + " ORDER BY created", (state,) if state else ())
        return [Request(*r) for r in rows]

    def pending_count(self) -> int:
        return self._exec("SELECT (SELECT COUNT(*) FROM requests WHERE state IN ('pending', 'report')) + "
                          "(SELECT COUNT(*) FROM grants WHERE state IN ('exchange', 'store'))")[0][0]

    def next_due(self) -> float | None:
        row = self._exec("SELECT MIN(next_at) FROM (SELECT next_at FROM requests WHERE state IN ('pending', 'report') "
                         "UNION ALL SELECT next_at FROM grants WHERE state IN ('exchange', 'store'))")
        return row[0][0] if row and row[0][0] is not None else None

    def depth(self) -> dict[str, int]:
        """What still waits, by table and state (``/metrics``: the outbox-stuck alert)."""
        rows = self._exec("SELECT 'request', state, COUNT(*) FROM requests WHERE state IN ('pending', 'report') "
                          "GROUP BY state UNION ALL SELECT 'grant', state, COUNT(*) FROM grants "
                          "WHERE state IN ('exchange', 'store') GROUP BY state")
        return {f"{kind}:{state}": n for kind, state, n in rows}

    def oldest_pending_created(self) -> float | None:
        """``created`` of the oldest request or grant still waiting (None: nothing waits)."""
        row = self._exec("SELECT MIN(created) FROM (SELECT created FROM requests WHERE state IN ('pending', 'report') "
                         "UNION ALL SELECT created FROM grants WHERE state IN ('exchange', 'store'))")
        return row[0][0] if row and row[0][0] is not None else None
