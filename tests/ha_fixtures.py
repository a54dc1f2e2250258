"""The ``ha`` fixture: Prefect's highly available topology on network-namespace hosts.

One topology per session (visitflow/production/ha_topology.py owns it; deployments/ha/ is
the operator's script around the same module).  ``VISITFLOW_HA_STATE=/tmp/vfha-xxxx`` reuses
one brought up by ``deployments/ha/up.sh`` (and leaves it running).  When a part is missing
(root, nginx, redis-server, PostgreSQL, prefect-redis) the suite skips — except under
``CI=true``, where it fails: CI installs them (.ci/install-nginx, .ci/install-redis).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from visitflow.core import names as grants, oauth
from visitflow.core.scopes import grant_scopes

BLUEAPI_SECRET = "blueapi-dev-secret"


class HAHelpers:
    """What the fault tests do as blueapi and as Alice on the topology."""

    def __init__(self, topo):
        from visitflow.core.prefect_api import PrefectAPI

        self.topo = topo
        self.api = PrefectAPI(topo.api_url, timeout=30)
        self.token_url = f"{topo.issuer}/token"

    def alice(self) -> str:
        return oauth.password_login(self.token_url, "alice", "alice").access_token

    def delegate(self, analysis: str, visit: str, uid: str) -> None:
        """What the trigger does at the start document: exchange, store the grant."""
        grant = oauth.exchange(self.token_url, self.alice(), client_id="blueapi", client_secret=BLUEAPI_SECRET,
                               audience="visitflow", scope=str(grant_scopes(analysis, visit, uid))).access_token
        self.api.save_secret(grants.grant_secret_name(analysis, visit, uid), grant)

    def states(self, flow_run_id: str) -> list[dict]:
        return self.api.request("GET", "/flow_run_states/", params={"flow_run_id": flow_run_id})

    def ensure_workers(self) -> None:
        """Every worker host has a running worker (a fault test may have killed one)."""
        import httpx

        for host in self.topo.worker_hosts:
            url = f"http://{host.address}:{self.topo.ports['worker_health']}/health"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    continue
            except httpx.HTTPError:
                pass
            self.topo.kill_host(host)
            self.topo.worker(host).wait_ready(120)


@pytest.fixture(scope="session")
def ha(tmp_path_factory):
    from visitflow.production.ha_topology import HATopology, PREFIX, missing_parts

    reuse = os.environ.get("VISITFLOW_HA_STATE")
    if reuse:
        topo = HATopology.attach(Path(reuse))
        helpers = HAHelpers(topo)
        yield helpers
        helpers.api.close()
        return
    missing = missing_parts()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the ha suite; missing: {', '.join(missing)}")
        pytest.skip(f"HA topology needs: {', '.join(missing)}")
    topo = HATopology(Path("/tmp/placeholder"))
    topo.state = Path(f"/tmp/{PREFIX}-{topo.tag}")   # not tmp_path: the postgres OS user must reach it
    topo.up()
    helpers = HAHelpers(topo)
    try:
        yield helpers
    finally:
        helpers.api.close()
        topo.down()
        shutil.rmtree(topo.state, ignore_errors=True)
