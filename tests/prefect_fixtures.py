"""The ``prefect_stack`` fixture: a real Prefect server (SQLite), the local process work
pool with its queues, the ScopedCredentials block, the deployments from prefect.yaml and a
process worker — wired to the session's real IdP and Tiled."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from visitflow.core import names as grants
from visitflow.core.prefect_api import PrefectAPI
from visitflow.stack.services import Service, free_port
from visitflow.stack import prefect as pstack

CLIENT_SECRET = "visitflow-dev-secret"


@dataclass
class PrefectStack:
    api_url: str
    env: dict
    server: Service
    worker: Service
    api: PrefectAPI

    def store_grant(self, analysis: str, visit: str, run_id: str, token: str) -> str:
        name = grants.grant_secret_name(analysis, visit, run_id)
        self.api.save_secret(name, token)
        return name

    def run(self, analysis: str, variant: str, visit: str, run_id: str, *, wait: bool = True,
            timeout: float = 240, idempotency_key: str | None = None) -> dict:
        if idempotency_key is None:
            fr = self.api.create_analysis_run(analysis, variant, visit, run_id)
        else:
            fr = self.api.create_flow_run(grants.deployment_name(analysis, variant), {"visit": visit, "run_id": run_id},
                                          idempotency_key=idempotency_key,
                                          tags=grants.run_tags(analysis, visit, run_id, variant))
        return self.api.wait_for_flow_run(fr["id"], timeout=timeout) if wait else fr

    def logs(self, flow_run_id: str, wait_for: str | None = None, timeout: float = 15) -> str:
        """The flow run's logs as stored by the server; ``wait_for`` polls until that text
        arrives (logs are shipped in batches, so they can trail the final state)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            rows = self.api.request("POST", "/logs/filter", json={
                "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
            text = "\n".join(r["message"] for r in rows)
            if wait_for is None or wait_for in text or time.monotonic() > deadline:
                return text
            time.sleep(0.3)


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, idp, tiled_server):
    state = tmp_path_factory.mktemp("prefect")
    port = free_port()
    # VISITFLOW_TEST_PREFECT_DATABASE_URL=postgresql+asyncpg://... runs the suite on PostgreSQL.
    server = pstack.start_server(state, port, ui=False,
                                 database_url=os.environ.get("VISITFLOW_TEST_PREFECT_DATABASE_URL"))
    worker = None
    try:
        server.wait_ready(timeout=180)
        env = pstack.prefect_env(f"http://127.0.0.1:{port}/api", state / "prefect")
        pstack.configure(env, issuer=idp.issuer, tiled_uri=tiled_server.uri)
        worker = pstack.start_worker(state, env, health_port=free_port(), client_secret=CLIENT_SECRET)
        worker.wait_ready(timeout=120)
        api = PrefectAPI(env["PREFECT_API_URL"])
        yield PrefectStack(env["PREFECT_API_URL"], env, server, worker, api)
        api.close()
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
