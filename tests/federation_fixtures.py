"""The facility's parts for the ``opa`` suite: the facility IdP, the token service in
production mode (``deployments/token-service.yaml``) trusting it and asking a real OPA.

The facility IdP is the real Keycloak of the session (``tests/keycloak_fixtures.py``, shared
with the ``keycloak`` suite), realm ``facility``: identity only — users alice, bob, carol,
dave; logins carry ``aud`` blueapi + tiled; no per-visit scopes or roles (derived from the
shipped realm by :func:`visitflow.production.keycloak_identity.identity_realm`).  The token
service and Tiled trust it through discovery + JWKS only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.idp_fixtures import IdPHandle
from visitflow.stack.services import Service, free_port, start_service

REPO = Path(__file__).resolve().parents[1]
TOKEN_SERVICE_CONFIG = REPO / "deployments" / "token-service.yaml"
TS_SECRETS = {"blueapi": "ts-blueapi-secret", "visitflow": "ts-visitflow-secret",
              "tiled": "ts-tiled-secret", "visitflow-admin": "ts-admin-secret"}
TS_ENV = {"VISITFLOW_BLUEAPI_SECRET": TS_SECRETS["blueapi"], "VISITFLOW_VISITFLOW_SECRET": TS_SECRETS["visitflow"],
          "VISITFLOW_TILED_SECRET": TS_SECRETS["tiled"], "VISITFLOW_ADMIN_SECRET": TS_SECRETS["visitflow-admin"]}

def token_service_config(facility_issuer: str, opa_url: str, cache_seconds: float = 2.0) -> dict:
    """deployments/token-service.yaml with this session's facility IdP and OPA."""
    config = yaml.safe_load(TOKEN_SERVICE_CONFIG.read_text())
    config["federation"]["issuers"] = [{"issuer": facility_issuer}]
    config["federation"]["authority"].update(url=opa_url, cache_seconds=cache_seconds)
    return config


@dataclass
class TokenServiceHandle(IdPHandle):
    """The token service: IdPHandle's helpers with the production secrets."""

    config_path: Path = None
    state_dir: Path = None
    port: int = 0

    def exchange_response(self, subject_token, client_id, secret=None, audience=None, scope=None, refresh=False):
        return super().exchange_response(subject_token, client_id, secret or TS_SECRETS[client_id], audience, scope,
                                         refresh=refresh)

    def client_token(self, client_id, secret=None, scope=None):
        return super().client_token(client_id, secret or TS_SECRETS[client_id], scope)

    def revoke(self, token: str, client_id: str = "blueapi"):
        import httpx

        return httpx.post(f"{self.issuer}/revoke", data={"token": token},
                          auth=(client_id, TS_SECRETS[client_id]), timeout=10)

    def restart(self) -> None:
        self.service.stop()
        self.service = _spawn(self.config_path, self.state_dir, self.port)
        self.service.wait_ready(timeout=60)


def _spawn(config_path: Path, state_dir: Path, port: int) -> Service:
    return start_service(
        "token-service", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(config_path),
                          "--port", str(port), "--state-dir", str(state_dir), "--log-level", "warning"],
        log_dir=state_dir.parent / "logs", health_url=f"http://127.0.0.1:{port}/health", env=TS_ENV)


def start_token_service(tmp: Path, facility_issuer: str, opa_url: str, **kw) -> TokenServiceHandle:
    from visitflow.token_service.keys import KeyStore

    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / "token-service.yaml"
    config_path.write_text(yaml.safe_dump(token_service_config(facility_issuer, opa_url, **kw)))
    state_dir = tmp / "state"
    KeyStore(state_dir / "keys")  # so tests can sign with its real key
    port = free_port()
    service = _spawn(config_path, state_dir, port)
    service.wait_ready(timeout=60)
    return TokenServiceHandle(f"http://127.0.0.1:{port}", state_dir / "keys", service,
                              config_path=config_path, state_dir=state_dir, port=port)


@pytest.fixture(scope="session")
def facility(keycloak):
    """The facility IdP: realm ``facility`` of the session's real Keycloak (module docstring)."""
    from tests.keycloak_fixtures import FACILITY_REALM, wait_for_realm

    handle = keycloak.realm_handle(FACILITY_REALM)
    wait_for_realm(handle.issuer)
    return handle


@pytest.fixture(scope="session")
def token_service(tmp_path_factory, facility, opa):
    handle = start_token_service(tmp_path_factory.mktemp("token-service"), facility.issuer, opa.url)
    yield handle
    handle.service.stop()




@pytest.fixture(scope="session")
def facility_tiled(tmp_path_factory, token_service, facility, opa):
    """Tiled as at the facility: run tokens from the token service (their scopes decide),
    users' own tokens from the facility IdP (OPA decides, cached 2 s); visits a1, a2."""
    from tests.tiled_fixtures import VISITS, start_tiled
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    handle = start_tiled(token_service, tmp_path_factory.mktemp("facility-tiled"), extra_args=(
        "--user-issuer", facility.issuer, "--authority-url", opa.url, "--authority-cache", "2"))
    try:
        ensure_visits(handle.uri, admin_auth(token_service.issuer, "visitflow-admin", TS_SECRETS["visitflow-admin"]),
                      VISITS, layout=handle.layout)
        yield handle
    finally:
        handle.service.stop()


__all__ = ["facility", "token_service", "facility_tiled", "start_token_service", "TS_SECRETS", "TS_ENV"]
