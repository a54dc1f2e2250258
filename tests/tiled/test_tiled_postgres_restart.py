"""Tiled on PostgreSQL through the shipped entry points (``visitflow tiled-config``, ``visitflow
tiled serve --config``) rides through a PostgreSQL restart between two scans: the first scan
after the restart writes with no 500 and no error, because visitflow.tiled.reconnect pings each
pooled connection of Tiled's catalog and tabular storage when it is checked out.

Without that ping (checked by disabling it, 2026-12-08), this test fails: the first scan after the
restart met two 500s (``GET /api/v1/metadata/`` with ``InterfaceError: connection is closed``, and
the ``POST`` creating its event table, whose storage connection was dead); Tiled's client retried
both, so only the server's log shows them — but it does not retry appending rows.  The log must
also show the ping replacing dead connections of both pools, so this test sees the path it tests.

Its own PostgreSQL cluster (deployments/postgres/start-local.sh, restarted by stop-local.sh +
start-local.sh on the same directory and port), so the session's cluster is not disturbed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.postgres import create_database
from tests.fixtures.scans import run_scan, user_root
from tests.fixtures.tiled_fixtures import VISITS
from tests.tiled.test_tiled_postgres import render_config
from visitflow.core.layout import Layout
from visitflow.stack.services import free_port, start_service

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "deployments" / "postgres"
POINTS = 15
_N = itertools.count()


def _pg(directory: Path, port: int) -> str:
    done = subprocess.run(["bash", str(SCRIPTS / "start-local.sh"), str(directory), str(port)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def own_pg():
    # the postgres OS user must reach the directory (pytest's tmp dirs are 0700 under root)
    directory = Path(f"/tmp/vf-test-pg-restart-{os.getpid()}-{next(_N)}")
    port = free_port()
    try:
        yield {"url": _pg(directory, port), "dir": directory, "port": port}
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop-local.sh"), str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_scan_right_after_a_postgres_restart_writes_with_no_500(own_pg, idp, tmp_path):
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    url = own_pg["url"]
    port = free_port()
    config = render_config(idp, tmp_path / "state", port, {
        "catalog": create_database(url, "catalog", "postgresql+asyncpg"), "tables": create_database(url, "tables"),
        "authn": create_database(url, "authn", "postgresql+asyncpg")})
    service = start_service("tiled-pg-restart", [sys.executable, "-m", "visitflow.cli", "tiled", "serve", "--config",
                                                 str(config), "--log-level", "info"],
                            log_dir=tmp_path / "logs", health_url=f"http://127.0.0.1:{port}/api/v1/")
    try:
        service.wait_ready(timeout=240)
        uri = f"http://127.0.0.1:{port}"
        ensure_visits(uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), VISITS,
                      layout=Layout.from_templates())
        before = run_scan(uri, idp.token("alice"), visit="a1", num=POINTS, seed=1)   # every pool holds connections

        subprocess.run(["bash", str(SCRIPTS / "stop-local.sh"), str(own_pg["dir"])], check=True,
                       capture_output=True, timeout=120)
        assert _pg(own_pg["dir"], own_pg["port"]) == url, "restarted on the same port, same password"

        after = run_scan(uri, idp.token("alice"), visit="a1", num=POINTS, seed=2)   # raises on any 4xx/5xx
        root = user_root(uri, idp.token("alice"))
        for uid in (before, after):
            seq = root["raw"]["a1"][uid]["primary"]["seq_num"].read()
            assert sorted(int(v) for v in seq) == list(range(1, POINTS + 1)), "each event once, none lost"
    finally:
        service.stop()
    log = service.log_path.read_text()
    assert '" 500' not in log and "Traceback" not in log, log[-4000:]
    assert "catalog: a pooled connection failed its ping" in log, "the catalog's dead connections were replaced"
    assert "tabular storage: a pooled connection failed its ping" in log, "the storage's dead connections were replaced"
