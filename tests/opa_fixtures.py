"""The ``opa`` fixture: a real OPA server (the pinned build, ``deployments/opa/install.sh``)
with visitflow's policy and the facility-shaped data bundle, once per session.

Clients reach it through a :class:`~tests.tcp_proxy.SwitchableProxy`, so a test can make
"OPA is down" happen without losing the server's state; ``set_data`` / ``reset_data`` change
the bundle over OPA's REST API (``PUT /v1/data/...``) as a user office sync would.
Under ``CI=true`` a missing OPA binary fails the suite instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.tcp_proxy import SwitchableProxy
from visitflow.stack.services import Service, free_port, start_service

REPO = Path(__file__).resolve().parents[1]
OPA_DIR = REPO / "deployments" / "opa"
POLICY = OPA_DIR / "authz.rego"
DATA = OPA_DIR / "data.json"


def opa_binary() -> str | None:
    """``$VISITFLOW_OPA``, else the cached pinned build (install.sh prints its path), else PATH."""
    if os.environ.get("VISITFLOW_OPA"):
        return os.environ["VISITFLOW_OPA"]
    cached = Path("/opt/visitflow-cache/opa/v1.22.3/opa")
    if cached.exists():
        return str(cached)
    return shutil.which("opa")


def require_opa() -> str:
    binary = opa_binary()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("OPA is not installed (bash deployments/opa/install.sh); the opa suite must run in CI")
        pytest.skip("OPA is not installed: bash deployments/opa/install.sh")
    return binary


@dataclass
class OPAHandle:
    direct_url: str
    proxy: SwitchableProxy
    service: Service

    @property
    def url(self) -> str:
        """What the token service and Tiled are configured with (through the switch)."""
        return f"http://127.0.0.1:{self.proxy.port}"

    def down(self) -> None:
        self.proxy.cut()

    def up(self) -> None:
        self.proxy.enabled = True

    def set_data(self, path: str, value) -> None:
        r = httpx.put(f"{self.direct_url}/v1/data/{path.strip('/')}", json=value, timeout=10)
        assert r.status_code == 204, r.text

    def reset_data(self) -> None:
        self.set_data("facility", json.loads(DATA.read_text())["facility"])

    def decide(self, inp: dict) -> dict:
        r = httpx.post(f"{self.direct_url}/v1/data/visitflow/authz/decision", json={"input": inp}, timeout=10)
        r.raise_for_status()
        return r.json()["result"]


def start_opa(tmp: Path) -> OPAHandle:
    binary = require_opa()
    port = free_port()
    service = start_service(
        "opa", [binary, "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error",
                str(POLICY), str(DATA)],
        log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/health")
    try:
        service.wait_ready(timeout=60)
    except Exception:
        service.stop()
        raise
    return OPAHandle(f"http://127.0.0.1:{port}", SwitchableProxy(port, enabled=True), service)


@pytest.fixture(scope="session")
def opa(tmp_path_factory):
    handle = start_opa(tmp_path_factory.mktemp("opa"))
    yield handle
    handle.proxy.close()
    handle.service.stop()


def run_opa_tests() -> subprocess.CompletedProcess:
    """``opa test deployments/opa -v`` (the Rego unit tests)."""
    return subprocess.run([require_opa(), "test", str(OPA_DIR), "-v"], capture_output=True, text=True, timeout=300)
