"""The token service's shared state in PostgreSQL, so several replicas act as one.

What one replica does, the others must honour (issue 21 item 4): a revocation (of a token
``jti`` or a whole session ``sid``), a refresh token issued or redeemed (refresh tokens
rotate; presenting a used one again revokes its session — "family reuse detection" — and
that must hold whichever replica each request reaches), and the signing keys
(:mod:`.pg_keys`).

* **Revocations** are written through (the revoking request waits for the commit) and read
  by every replica at most ``poll_seconds`` old (:meth:`PostgresState.poll`): that is the
  stated bound a revocation takes to reach the other replicas.
* **Refresh tokens** are never cached: redeeming one is one conditional ``UPDATE ... WHERE
  used = false``, so of two replicas racing on the same token exactly one wins, and the
  session's revocation is read in the same statement.  Only a SHA-256 of each refresh token
  is stored (a copy of the database cannot be replayed as refresh tokens).

The driver is asyncpg through SQLAlchemy's asyncio engine — both already installed with
Prefect, whose own database code does the same.  The token service's grant handlers are
synchronous (they run in Starlette's thread pool), so the engine lives on one event loop in
a daemon thread and handlers submit to it (:meth:`PostgresState.run`): hand-rolled, because
SQLAlchemy has no synchronous asyncpg dialect and adding a second PostgreSQL driver (psycopg)
for this alone was not worth a dependency.  A database that does not answer is a 503
``temporarily_unavailable`` with the reason, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..core.scopes import ScopeSet
from ..errors import OAuthError

__all__ = ['METADATA', 'REVOCATIONS', 'REFRESH_TOKENS', 'SIGNING_KEYS', 'async_url', 'PostgresState',
           'PostgresRefreshes']

log = logging.getLogger("visitflow.idp.state")

METADATA = sa.MetaData()

#: jti / sid revocations, unexpired ones only matter (``exp``)
REVOCATIONS = sa.Table(
    "vf_revocations", METADATA,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("exp", sa.Float, nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
)

#: refresh tokens (by hash) with their session: one row per token, ``sid`` is the family
REFRESH_TOKENS = sa.Table(
    "vf_refresh_tokens", METADATA,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("sid", sa.String(64), nullable=False, index=True),
    sa.Column("session", sa.Text, nullable=False),   # the Session, JSON
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("expires", sa.Float, nullable=False, index=True),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)

#: RS256 keys; the newest whose ``signs_from`` has passed signs, all are in the JWKS
SIGNING_KEYS = sa.Table(
    "vf_signing_keys", METADATA,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("pem", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("signs_from", sa.Float, nullable=False),
)


def async_url(url: str) -> str:
    """``postgresql://`` (as operators write it) → SQLAlchemy's asyncpg dialect."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    raise ValueError("the token service's database URL must start with postgresql://")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unavailable(exc: BaseException) -> OAuthError:
    return OAuthError("temporarily_unavailable", f"the token service's database did not answer: "
                      f"{type(exc).__name__}", 503, {"Retry-After": "1"})


class PostgresState:
    """One replica's connection to the shared state.  ``path`` is None (no state directory)."""

    path = None

    def __init__(self, url: str, *, poll_seconds: float = 1.0, timeout: float = 5.0):
        from sqlalchemy.ext.asyncio import create_async_engine

        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="visitflow-idp-db", daemon=True)
        self._thread.start()
        self._engine = create_async_engine(async_url(url), pool_size=5, max_overflow=5, pool_pre_ping=True,
                                           connect_args={"timeout": timeout, "command_timeout": timeout})
        self._polled = 0.0
        self._poll_lock = threading.Lock()
        self.refreshes = PostgresRefreshes(self)
        self.run(self._create_schema())

    # ------------------------------------------------------------------ plumbing
    def run(self, coro) -> Any:
        """Run ``coro`` on the state's loop; a database failure is a 503 (:func:`_unavailable`)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout * 2)
        except OAuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, server gone: all 503
            future.cancel()
            log.warning("token service database: %s: %s", type(exc).__name__, exc)
            raise _unavailable(exc) from exc

    async def _create_schema(self) -> None:
        async with self._engine.begin() as conn:
            # two replicas starting at once: serialise the CREATE TABLEs
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
            await conn.run_sync(METADATA.create_all)

    async def _execute(self, statement, *, fetch: bool = False):
        async with self._engine.begin() as conn:
            result = await conn.execute(statement)
            return result.all() if fetch else result.rowcount

    def probe(self) -> str:
        """``/readyz``: the database answers a query now."""
        self.run(self._execute(sa.select(sa.literal(1)), fetch=True))
        return "postgresql answers"

    def close(self) -> None:
        self.run(self._engine.dispose())
        self._loop.call_soon_threadsafe(self._loop.stop)

    # ------------------------------------------------------------------ revocations (RevocationLog's interface)
    def load(self) -> tuple[dict, dict]:
        """(revoked jti → exp, revoked sid → exp), unexpired only."""
        now = time.time()
        rows = self.run(self._execute(
            sa.select(REVOCATIONS.c.kind, REVOCATIONS.c.id, REVOCATIONS.c.exp).where(REVOCATIONS.c.exp > now),
            fetch=True))
        self._polled = time.monotonic()
        jtis = {r.id: r.exp for r in rows if r.kind == "jti"}
        sids = {r.id: r.exp for r in rows if r.kind == "sid"}
        return jtis, sids

    def poll(self) -> tuple[dict, dict] | None:
        """:meth:`load` if the last one is ``poll_seconds`` old, else None (nothing to merge)."""
        with self._poll_lock:
            if time.monotonic() - self._polled < self.poll_seconds:
                return None
            return self.load()

    def append(self, kind: str, ident: str, exp: float) -> None:
        stmt = pg_insert(REVOCATIONS).values(kind=kind, id=ident, exp=exp, at=time.time())
        self.run(self._execute(stmt.on_conflict_do_update(
            index_elements=["kind", "id"], set_={"exp": sa.func.greatest(REVOCATIONS.c.exp, stmt.excluded.exp)})))

    def purge(self, now: float | None = None) -> int:
        """Drop expired revocations and refresh tokens (the runbook's housekeeping); returns rows."""
        now = now or time.time()

        async def go():
            async with self._engine.begin() as conn:
                a = await conn.execute(sa.delete(REVOCATIONS).where(REVOCATIONS.c.exp < now))
                b = await conn.execute(sa.delete(REFRESH_TOKENS).where(REFRESH_TOKENS.c.expires < now))
                return a.rowcount + b.rowcount

        return self.run(go())


class PostgresRefreshes:
    """Refresh tokens in ``vf_refresh_tokens``; the interface of ``server.MemoryRefreshes``."""

    def __init__(self, db: PostgresState):
        self.db = db

    def put(self, token: str, rec) -> None:
        from dataclasses import asdict

        session = asdict(rec.session)
        session["scopes"] = str(rec.session.scopes)
        self.db.run(self.db._execute(sa.insert(REFRESH_TOKENS).values(
            token_hash=_hash(token), sid=rec.session.sid, session=json.dumps(session), scopes=str(rec.scopes),
            expires=rec.expires, used=False)))

    def _record(self, row, revoked: bool):
        from .server import RefreshRecord, Session

        data = json.loads(row.session)
        data["scopes"] = ScopeSet.lenient(data["scopes"])
        data["revoked"] = bool(revoked)
        return RefreshRecord(Session(**data), ScopeSet.lenient(row.scopes), row.expires, used=bool(row.used))

    def _revoked_sid(self):
        return sa.exists().where(REVOCATIONS.c.kind == "sid", REVOCATIONS.c.id == REFRESH_TOKENS.c.sid)

    def peek(self, token: str):
        rows = self.db.run(self.db._execute(
            sa.select(REFRESH_TOKENS, self._revoked_sid().label("revoked"))
            .where(REFRESH_TOKENS.c.token_hash == _hash(token)), fetch=True))
        return self._record(rows[0], rows[0].revoked) if rows else None

    def redeem(self, token: str):
        """(record, fresh): ``fresh`` is True for exactly one redeemer of a token, across replicas."""
        async def go():
            async with self.db._engine.begin() as conn:
                won = (await conn.execute(
                    sa.update(REFRESH_TOKENS).where(REFRESH_TOKENS.c.token_hash == _hash(token),
                                                    REFRESH_TOKENS.c.used.is_(False))
                    .values(used=True)
                    .returning(*REFRESH_TOKENS.c, self._revoked_sid().label("revoked")))).all()
                if won:
                    return won[0], True
                rows = (await conn.execute(
                    sa.select(REFRESH_TOKENS, self._revoked_sid().label("revoked"))
                    .where(REFRESH_TOKENS.c.token_hash == _hash(token)))).all()
                return (rows[0] if rows else None), False

        row, fresh = self.db.run(go())
        return (self._record(row, row.revoked) if row is not None else None), fresh
