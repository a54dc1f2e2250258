"""visitflow/tiled/reconnect.py's pure parts: the storage ping's outcomes on a stand-in ADBC
connection, and that each pool gets the ping once.  The restart itself, on a real PostgreSQL
and Tiled: tests/tiled/test_tiled_postgres_restart.py."""

from __future__ import annotations

import asyncio
import types

import pytest
from sqlalchemy.exc import DisconnectionError

from visitflow.tiled import reconnect


class _Cursor:
    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql):
        self.conn.calls.append(sql)
        if self.conn.dead:
            raise OSError("IO: [libpq] Failed to begin transaction: FATAL: terminating connection")

    def fetchall(self):
        return [(1,)]

    def close(self):
        self.conn.calls.append("close")


class _Conn:
    def __init__(self, dead=False):
        self.dead, self.calls = dead, []

    def cursor(self):
        return _Cursor(self)

    def rollback(self):
        self.calls.append("rollback")


def test_a_live_storage_connection_is_handed_over_clean():
    conn = _Conn()
    reconnect._adbc_ping(conn, None, None)
    assert conn.calls == ["SELECT 1", "close", "rollback"]   # no transaction left open for the caller


def test_a_dead_storage_connection_is_a_disconnection_so_the_pool_replaces_it():
    conn = _Conn(dead=True)
    with pytest.raises(DisconnectionError, match="terminating connection"):
        reconnect._adbc_ping(conn, None, None)
    assert conn.calls == ["SELECT 1", "close"]


def test_the_storage_pool_is_wrapped_once_and_keeps_its_cache_key():
    from visitflow.tiled.tiled_compat import SQLStorage

    reconnect.install_storage_ping()
    assert reconnect.install_storage_ping() is False
    prop = SQLStorage.__dict__["_connection_pool"]
    assert prop.func.visitflow_ping and prop.attrname == "_connection_pool"   # SQLStorage.dispose pops that key


def test_only_a_postgres_catalog_is_pinged_not_sqlite_nor_a_tree_without_an_engine():
    """SQLite has no server to lose, and its ping can meet another writer's lock (POSTGRES says
    why); on PostgreSQL every checkout pings (tests/tiled/test_tiled_postgres_restart.py)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    assert reconnect.ping_catalog(None) is False
    assert reconnect.ping_catalog(types.SimpleNamespace(context=None)) is False
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        assert reconnect.ping_catalog(types.SimpleNamespace(context=types.SimpleNamespace(engine=engine))) is False
    finally:
        asyncio.run(engine.dispose())
