"""``/healthz`` and ``/readyz`` on the real servers, with a dependency really stopped.

The probes the manifests use (docs/operations.md "Probes"): liveness ``/healthz``,
readiness ``/readyz``; not ready is a 503 naming the failing dependency and why.
"""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures.idp_fixtures import start_idp
from tests.fixtures.opa_fixtures import start_opa
from tests.fixtures.federation_fixtures import start_token_service

pytestmark = pytest.mark.ops


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=15)


def test_token_service_ready_then_not_ready_when_opa_stops_and_when_the_facility_idp_stops(tmp_path):
    """Its own IdP and OPA (stopped here): readiness follows them, liveness does not."""
    facility = start_idp(tmp_path / "facility")
    opa = start_opa(tmp_path / "opa")
    ts = start_token_service(tmp_path / "ts", facility.issuer, opa.direct_url)
    try:
        r = _get(f"{ts.issuer}/readyz")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready"
        assert set(body["checks"]) == {f"facility-idp:{facility.issuer}", "authority", "state", "signing-key"}

        opa.service.stop()   # the process, not a proxy
        r = _get(f"{ts.issuer}/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["failing"] == ["authority"]
        assert "ConnectError" in r.json()["checks"]["authority"]["detail"]
        assert _get(f"{ts.issuer}/healthz").status_code == 200      # alive: a restart would not help

        facility.service.stop()
        r = _get(f"{ts.issuer}/readyz")
        assert r.status_code == 503
        assert r.json()["failing"] == sorted(["authority", f"facility-idp:{facility.issuer}"])
        assert facility.issuer in r.json()["checks"][f"facility-idp:{facility.issuer}"]["detail"] or \
            "Error" in r.json()["checks"][f"facility-idp:{facility.issuer}"]["detail"]
    finally:
        ts.service.stop()
        opa.service.stop()
        facility.service.stop()


def test_dev_idp_readiness_checks_its_state_and_key(ops_idp):
    r = _get(f"{ops_idp.issuer}/readyz")
    assert r.status_code == 200, r.text
    assert set(r.json()["checks"]) == {"state", "signing-key"}
    assert _get(f"{ops_idp.issuer}/healthz").json()["status"] == "ok"


def test_tiled_ready_then_not_ready_when_its_token_service_stops(tmp_path):
    from tests.fixtures.tiled_fixtures import start_tiled

    idp = start_idp(tmp_path / "idp")
    tiled = start_tiled(idp, tmp_path / "tiled")
    try:
        r = _get(f"{tiled.uri}/readyz")
        assert r.status_code == 200, r.text
        assert set(r.json()["checks"]) == {"catalog-database", "principals-database", "token-service"}
        assert _get(f"{tiled.uri}/healthz").status_code == 200
        idp.service.stop()
        r = _get(f"{tiled.uri}/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["failing"] == ["token-service"]
        assert "ConnectError" in r.json()["checks"]["token-service"]["detail"]
        assert _get(f"{tiled.uri}/healthz").status_code == 200
    finally:
        tiled.service.stop()
        idp.service.stop()
