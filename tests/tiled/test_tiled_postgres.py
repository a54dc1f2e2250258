"""Tiled on PostgreSQL (catalog, tabular storage and principals) through the shipped entry
points: ``visitflow tiled-config --catalog-database --tabular-storage --authn-database``
renders the file, ``visitflow tiled serve --config FILE`` serves it with visitflow's
middleware and AuthGate, and two bluesky scans written at once give no 500 and no duplicate
rows (on the SQLite default they gave "database is locked" 500s).

The control: the same file under a plain ``tiled serve config`` lacks the gate, and the
policy then fails closed — the user's reads are refused — which is why ``--config`` exists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.postgres_fixtures import db_url, fetch, fresh_databases
from tests.fixtures.scans import start_scan_thread
from tests.fixtures.tiled_fixtures import VISITS
from visitflow.core.layout import Layout
from visitflow.stack.services import free_port, start_service

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
POINTS = 25


def render_config(idp, state: Path, port: int, urls: dict) -> Path:
    """``visitflow tiled-config`` with the ``catalog``, ``tables`` and ``authn`` database URLs
    (also tests/tiled/test_tiled_postgres_restart.py's); the state's data directory made."""
    out = state.parent / "tiled.yml"
    done = subprocess.run(
        [sys.executable, "-m", "visitflow.cli", "tiled-config", "--issuer", idp.issuer, "--state-dir", str(state),
         "--port", str(port), "--catalog-database", urls["catalog"], "--tabular-storage", urls["tables"],
         "--authn-database", urls["authn"], "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (state / "data").mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def tiled_pg(idp, tmp_path_factory):
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    tmp = tmp_path_factory.mktemp("tiled-pg")
    with fresh_databases("catalog", "tables", "authn") as dbs:
        port = free_port()
        config = render_config(idp, tmp / "state", port, {
            "catalog": db_url(dbs["catalog"], "postgresql+asyncpg"), "tables": db_url(dbs["tables"]),
            "authn": db_url(dbs["authn"], "postgresql+asyncpg")})
        service = start_service("tiled", [sys.executable, "-m", "visitflow.cli", "tiled", "serve", "--config",
                                          str(config), "--log-level", "info"],
                                log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/api/v1/")
        try:
            service.wait_ready(timeout=240)
            uri = f"http://127.0.0.1:{port}"
            ensure_visits(uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), VISITS,
                          layout=Layout.from_templates())
            yield {"uri": uri, "config": config, "dbs": dbs, "service": service, "tmp": tmp}
        finally:
            service.stop()


def test_tiled_config_names_the_postgres_databases(tiled_pg):
    config = yaml.safe_load(tiled_pg["config"].read_text())
    dbs = tiled_pg["dbs"]
    assert config["catalog"]["uri"].endswith("/" + dbs["catalog"]) and config["catalog"]["uri"].startswith("postgresql+asyncpg")
    assert config["catalog"]["writable_storage"][1] == db_url(dbs["tables"])
    assert config["database"]["uri"].endswith("/" + dbs["authn"])
    tables = {r["tablename"] for r in fetch(dbs["catalog"], "select tablename from pg_tables where schemaname='public'")}
    assert {"nodes", "data_sources"} <= tables, "the catalog is in PostgreSQL"


def test_two_scans_at_once_on_postgres_no_500_no_duplicate_rows(tiled_pg, idp):
    from tests.fixtures.scans import user_root

    token = idp.token("alice")
    scans = [start_scan_thread(tiled_pg["uri"], token, visit="a1", num=POINTS, seed=i) for i in range(2)]
    for thread, _ in scans:
        thread.join(timeout=600)
    outcomes = [out for _, out in scans]
    assert all("uid" in o for o in outcomes), [o.get("error") for o in outcomes]
    log = tiled_pg["service"].log_path.read_text()
    assert '" 500' not in log and "database is locked" not in log, log[-3000:]

    root = user_root(tiled_pg["uri"], idp.token("alice"))
    for out in outcomes:
        seq = root["raw"]["a1"][out["uid"]]["primary"]["seq_num"].read()
        assert sorted(int(v) for v in seq) == list(range(1, POINTS + 1)), "each event once, none lost"
    dbs = tiled_pg["dbs"]
    dup = fetch(dbs["catalog"], "select parent, key, count(*) from nodes group by parent, key having count(*) > 1")
    assert dup == [], dup
    tables = [r["tablename"] for r in fetch(dbs["tables"], "select tablename from pg_tables "
                                                            "where schemaname='public' and tablename like 'table_%'")]
    assert tables, "the events are in PostgreSQL's tabular storage"
    rows = 0
    for name in tables:
        dups = fetch(dbs["tables"], f'select _dataset_id, seq_num, count(*) from "{name}" '
                                    "group by _dataset_id, seq_num having count(*) > 1")
        assert dups == [], (name, dups)
        rows += fetch(dbs["tables"], f'select count(*) as n from "{name}"')[0]["n"]
    assert rows == 2 * POINTS, rows


def test_serve_config_keeps_the_gate_a_plain_tiled_serve_does_not(tiled_pg, idp):
    """Same file, same databases, two servers: alice reads her visit through ``visitflow
    tiled serve --config``, and its AuthGate refuses a request carrying two credentials (issue
    20: one reading of every credential); through ``tiled serve config`` the same request is
    served -- the gate, and everything visitflow wraps around Tiled, is gone."""
    token = idp.token("alice")
    headers = {"Authorization": f"Bearer {token}"}
    ours = httpx.get(f"{tiled_pg['uri']}/api/v1/search/raw/a1", headers=headers, timeout=30)
    assert ours.status_code == 200 and ours.json()["data"], ("alice's runs (the scans above)", ours.text)
    two = httpx.get(f"{tiled_pg['uri']}/api/v1/search/raw/a1", headers=headers, params={"access_token": token},
                    timeout=30)
    assert two.status_code == 400 and "credential" in two.text, ("the gate refuses two credentials", two.text[:300])

    config = yaml.safe_load(tiled_pg["config"].read_text())
    port = free_port()
    config["uvicorn"]["port"] = port
    plain_cfg = tiled_pg["tmp"] / "plain.yml"
    plain_cfg.write_text(yaml.safe_dump(config))
    plain = start_service("tiled-plain", [str(BIN / "tiled"), "serve", "config", str(plain_cfg)],
                          log_dir=tiled_pg["tmp"] / "logs", health_url=f"http://127.0.0.1:{port}/api/v1/")
    try:
        plain.wait_ready(timeout=240)
        theirs = httpx.get(f"http://127.0.0.1:{port}/api/v1/search/raw/a1", headers=headers,
                           params={"access_token": token}, timeout=30)
    finally:
        plain.stop()
    assert theirs.status_code != 400, ("a plain `tiled serve config` has no gate: nothing refuses the second "
                                       "credential", theirs.text[:300])
