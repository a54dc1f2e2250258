"""Prefect server and a Tiled catalog on PostgreSQL: real servers, fresh databases.

Needs ``VISITFLOW_TEST_POSTGRES_URL``, naming a PostgreSQL role that may create databases,
e.g. the throwaway cluster of ``deployments/postgres/start-local.sh`` (``.ci/run`` starts one);
without it the module skips, and fails under CI (tests/fixtures/ci.py)::

    export VISITFLOW_TEST_POSTGRES_URL=$(deployments/postgres/start-local.sh /tmp/vf-pg 55432)
    python -m pytest tests/production/test_production_postgres.py -q -s

Each run creates two databases with random names (dropped afterwards), starts
``prefect server start`` on one (with an API auth string, as in production) and
``tiled serve catalog`` on the other, and proves both work through their HTTP APIs -- and that
the rows really are in PostgreSQL.  Start-up times are printed (``-s``) and recorded as test
properties.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.fixtures.ci import missing_part
from visitflow.production import kubernetes as k8s
from visitflow.stack.services import free_port, start_service

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_URL = os.environ.get("VISITFLOW_TEST_POSTGRES_URL", "")


@pytest.fixture(scope="module", autouse=True)
def postgres_url() -> str:
    """The cluster to test on.  Without one the module skips -- or FAILS under CI, where
    ``.ci/run`` starts a throwaway cluster (tests/fixtures/ci.py)."""
    if not PG_URL:
        missing_part("PostgreSQL tests need VISITFLOW_TEST_POSTGRES_URL (a role that may CREATE DATABASE); "
                     "e.g. export VISITFLOW_TEST_POSTGRES_URL=$(deployments/postgres/start-local.sh /tmp/vf-pg 55432)")
    return PG_URL


def db_url(database: str, driver: str = "postgresql") -> str:
    """The test URL pointed at another database (and, for SQLAlchemy, the asyncpg driver)."""
    parts = urlsplit(PG_URL)
    return urlunsplit((driver, parts.netloc, "/" + database, parts.query, ""))


async def _admin(statements: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(database: str, sql: str, *args):
    import asyncpg

    conn = await asyncpg.connect(db_url(database))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def databases(postgres_url):
    suffix = uuid.uuid4().hex[:10]
    names = {"prefect": f"vf_test_prefect_{suffix}", "tiled": f"vf_test_tiled_{suffix}"}
    asyncio.run(_admin([f'CREATE DATABASE "{n}"' for n in names.values()]))
    yield names
    asyncio.run(_admin([f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names.values()]))


def _clean_env(**extra: str) -> dict:
    """Server environment: nothing inherited from the test session's Prefect settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TILED_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def prefect_pg(databases, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-pg")
    port = free_port()
    auth = f"admin:{secrets.token_urlsafe(12)}"
    env = _clean_env(
        PREFECT_HOME=str(home / "home"),
        PREFECT_API_DATABASE_CONNECTION_URL=db_url(databases["prefect"], "postgresql+asyncpg"),
        PREFECT_SERVER_API_AUTH_STRING=auth,
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    t0 = time.monotonic()
    service = start_service(
        "prefect-pg", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log_dir=home, health_url=f"http://127.0.0.1:{port}/api/health", env=env)
    subprocess_env_overrides = {k: v for k, v in env.items() if k.startswith("PREFECT_")}
    try:
        service.wait_ready(timeout=240)
        started = time.monotonic() - t0
        print(f"\n[timing] prefect server on PostgreSQL ready in {started:.1f} s")
        yield {"url": f"http://127.0.0.1:{port}/api", "auth": auth, "started": started,
               "db": databases["prefect"], "home": home, "server_env": subprocess_env_overrides}
    finally:
        service.stop()


@pytest.fixture(scope="module")
def tiled_pg(databases, tmp_path_factory):
    home = tmp_path_factory.mktemp("tiled-pg")
    port = free_port()
    api_key = secrets.token_hex(16)
    uri = db_url(databases["tiled"], "postgresql+asyncpg")
    env = _clean_env()
    t0 = time.monotonic()
    init = subprocess.run([str(BIN / "tiled"), "catalog", "init", uri], env=env,
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stdout + init.stderr
    t_init = time.monotonic() - t0
    (home / "data").mkdir()
    t1 = time.monotonic()
    service = start_service(
        "tiled-pg", [str(BIN / "tiled"), "serve", "catalog", uri, "-w", str(home / "data"),
                     "--api-key", api_key, "--host", "127.0.0.1", "--port", str(port)],
        log_dir=home, health_url=f"http://127.0.0.1:{port}/healthz", env=env)
    try:
        service.wait_ready(timeout=240)
        started = time.monotonic() - t1
        print(f"\n[timing] tiled catalog init on PostgreSQL {t_init:.1f} s; tiled server ready in {started:.1f} s")
        yield {"url": f"http://127.0.0.1:{port}", "api_key": api_key, "db": databases["tiled"],
               "init": t_init, "started": started}
    finally:
        service.stop()


# ------------------------------------------------------------------------- Prefect


def test_prefect_server_runs_on_postgres(prefect_pg, record_property):
    record_property("prefect_start_s", round(prefect_pg["started"], 1))
    url, auth = prefect_pg["url"], tuple(prefect_pg["auth"].split(":", 1))
    assert httpx.get(f"{url}/health", timeout=10).json() is True
    # the auth string is enforced (production puts an authenticating proxy in front as well)
    assert httpx.post(f"{url}/flows/filter", json={}, timeout=10).status_code == 401
    version = httpx.get(f"{url}/admin/version", auth=auth, timeout=10)
    assert version.status_code == 200
    tables = asyncio.run(_fetch(prefect_pg["db"], "select tablename from pg_tables where schemaname = 'public'"))
    assert {"flow", "flow_run", "deployment", "work_pool"} <= {r["tablename"] for r in tables}


def test_flow_run_roundtrip_and_job_render_on_postgres(prefect_pg, tmp_path):
    """Pool (our template, validated by the server), deployment, flow run -- stored in
    PostgreSQL, read back, and rendered into a Job by prefect-kubernetes from the server's data."""
    url, auth = prefect_pg["url"], tuple(prefect_pg["auth"].split(":", 1))
    http = httpx.Client(base_url=url, auth=auth, timeout=30)
    template = json.loads((ROOT / "deployments" / "kubernetes" / "base-job-template.json").read_text())
    pool = http.post("/work_pools/", json={"name": k8s.POOL_NAME, "type": "kubernetes",
                                           "base_job_template": template})
    assert pool.status_code == 201, pool.text
    flow_id = http.post("/flows/", json={"name": "saxs-average"}).json()["id"]
    dep = http.post("/deployments/", json={
        "name": "post", "flow_id": flow_id, "work_pool_name": k8s.POOL_NAME, "work_queue_name": "post",
        "entrypoint": "flows/saxs_average.py:saxs_average",
        "job_variables": {"image": "registry.example.org/visitflow-flows:0.1.0",
                          "env": {"VISITFLOW_CREDENTIALS_BLOCK": "visitflow"}},
    })
    assert dep.status_code in (200, 201), dep.text
    dep_id = dep.json()["id"]
    body = {"parameters": {"visit": "a1", "run_id": "r1"}, "idempotency_key": "saxs_average/post/a1/r1"}
    first = http.post(f"/deployments/{dep_id}/create_flow_run", json=body)
    assert first.status_code in (200, 201), first.text
    again = http.post(f"/deployments/{dep_id}/create_flow_run", json=body)
    assert again.json()["id"] == first.json()["id"]  # idempotency holds on PostgreSQL too
    run = http.get(f"/flow_runs/{first.json()['id']}").json()
    assert run["parameters"] == {"visit": "a1", "run_id": "r1"}
    assert run["deployment_id"] == dep_id
    assert run["work_queue_name"] == "post"
    rows = asyncio.run(_fetch(prefect_pg["db"], "select parameters from flow_run where id = $1",
                              uuid.UUID(run["id"])))
    assert len(rows) == 1 and json.loads(rows[0]["parameters"]) == {"visit": "a1", "run_id": "r1"}

    manifest = asyncio.run(_render_from_server(url, prefect_pg["auth"], run["id"]))
    assert k8s.secret_env_problems(manifest, (prefect_pg["auth"], prefect_pg["auth"].split(":", 1)[1])) == []
    env = {e["name"]: e for e in k8s.container_env(manifest)}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == run["id"]
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.org/visitflow-flows:0.1.0"


async def _render_from_server(url: str, auth: str, flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        async with get_client() as client:
            flow_run = await client.read_flow_run(uuid.UUID(flow_run_id))
            work_pool = await client.read_work_pool(k8s.POOL_NAME)
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=work_pool, worker_name="test-render")
    return config.job_manifest


def test_use_k8s_pool_script_against_postgres_server(prefect_pg, tmp_path):
    """The helper (re)creates the pool through the CLI and writes the retargeted prefect file."""
    env = _clean_env(PREFECT_API_URL=prefect_pg["url"], PREFECT_API_AUTH_STRING=prefect_pg["auth"],
                     PREFECT_HOME=str(tmp_path / "home"), VISITFLOW_K8S_OUT=str(tmp_path),
                     PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", str(ROOT / "deployments" / "kubernetes" / "use-k8s-pool.sh"),
                           "registry.example.org/visitflow-flows:0.1.0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = httpx.get(f"{prefect_pg['url']}/work_pools/{k8s.POOL_NAME}",
                     auth=tuple(prefect_pg["auth"].split(":", 1)), timeout=10).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(
        (ROOT / "deployments" / "kubernetes" / "base-job-template.json").read_text())
    if (ROOT / "prefect.yaml").exists():
        assert "visitflow-k8s" in (tmp_path / "prefect-k8s.yaml").read_text()


# --------------------------------------------------------------------------- Tiled


def test_tiled_catalog_on_postgres_writes_and_reads(tiled_pg, record_property):
    import numpy as np
    from tiled.client import from_uri

    record_property("tiled_start_s", round(tiled_pg["started"], 1))
    record_property("tiled_init_s", round(tiled_pg["init"], 1))
    client = from_uri(tiled_pg["url"], api_key=tiled_pg["api_key"])
    visit = client.create_container("a1", metadata={"visit": "a1"})
    data = np.arange(12, dtype="float64").reshape(3, 4)
    visit.write_array(data, key="average", metadata={"analysis": "saxs_average"})

    fresh = from_uri(tiled_pg["url"], api_key=tiled_pg["api_key"])
    np.testing.assert_array_equal(fresh["a1"]["average"].read(), data)
    assert fresh["a1"]["average"].metadata["analysis"] == "saxs_average"
    assert fresh["a1"].metadata["visit"] == "a1"
    # the catalog rows are in PostgreSQL
    rows = asyncio.run(_fetch(tiled_pg["db"], "select key from nodes"))
    assert {"a1", "average"} <= {r["key"] for r in rows}
    # without the key: refused
    assert httpx.get(f"{tiled_pg['url']}/api/v1/metadata/a1", timeout=10).status_code in (401, 403)
