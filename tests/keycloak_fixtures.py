"""The ``keycloak`` fixture: a real Keycloak 26 (dev mode, loopback) with our realm imported.

Started once per session by ``deployments/keycloak/start.sh`` (the distribution comes from
``deployments/keycloak/fetch.sh``, cached outside the checkout) on random loopback ports with a
fresh data directory, so every session starts from an empty database holding exactly:

* ``visitflow`` — ``deployments/keycloak/realm.json`` as shipped, plus two *test-only* clients:
  ``tests-short-lived`` (public, password grant, 5 s access tokens for tiled: the "expired"
  case) and nothing else; the shipped clients are untouched;
* ``elsewhere`` — another realm with the same client names and user ``alice``: its tokens
  look right and carry ``aud: tiled`` but come from another issuer with other keys.

``VISITFLOW_TEST_KEYCLOAK_URL=http://127.0.0.1:PORT`` reuses a running Keycloak instead (fast
iteration), started with the same realms by ``python -m tests.keycloak_fixtures DIR PORT``.
If Keycloak cannot be fetched the suite skips — except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.idp_fixtures import TokenCalls
from visitflow.services import Service, free_port, start_service

REPO = Path(__file__).resolve().parents[1]
KC_DIR = REPO / "deployments" / "keycloak"
REALM = "visitflow"
OTHER_REALM = "elsewhere"
SHORT_CLIENT = "tests-short-lived"
SHORT_LIFESPAN = 5
ADMIN = ("admin", "admin")  # dev-mode bootstrap admin of the throwaway instance


def _audience_mapper(aud: str) -> dict:
    return {"name": f"audience {aud}", "protocol": "openid-connect", "protocolMapper": "oidc-audience-mapper",
            "consentRequired": False,
            "config": {"included.client.audience": aud, "access.token.claim": "true",
                       "introspection.token.claim": "true", "id.token.claim": "false"}}


def realms_for_tests() -> list[dict]:
    """The realms a test Keycloak imports: ours (+ one test-only client) and a stranger."""
    realm = json.loads((KC_DIR / "realm.json").read_text())
    cli = next(c for c in realm["clients"] if c["clientId"] == "visitflow-cli")
    short = copy.deepcopy(cli)
    short.update(clientId=SHORT_CLIENT, name=SHORT_CLIENT,
                 description="TESTS ONLY: access tokens expire after a few seconds")
    short["attributes"] = {**short["attributes"], "access.token.lifespan": str(SHORT_LIFESPAN)}
    realm["clients"].append(short)

    other = {
        "realm": OTHER_REALM, "enabled": True, "sslRequired": "external", "accessTokenLifespan": 300,
        "clients": [{
            "clientId": "visitflow-cli", "enabled": True, "publicClient": True, "directAccessGrantsEnabled": True,
            "standardFlowEnabled": False, "fullScopeAllowed": False,
            "attributes": {"access.token.header.type.rfc9068": "true"},
            "protocolMappers": [_audience_mapper("tiled")],
            "defaultClientScopes": ["basic", "read:data:a1"],
        }],
        "clientScopes": [
            {"name": "basic", "protocol": "openid-connect", "attributes": {"include.in.token.scope": "false"},
             "protocolMappers": [{"name": "sub", "protocol": "openid-connect", "protocolMapper": "oidc-sub-mapper",
                                  "config": {"access.token.claim": "true", "introspection.token.claim": "true"}}]},
            {"name": "read:data:a1", "protocol": "openid-connect", "attributes": {"include.in.token.scope": "true"}},
        ],
        "users": [{"username": "alice", "enabled": True, "emailVerified": True, "firstName": "Alice",
                   "lastName": "Elsewhere", "email": "alice@elsewhere.example",
                   "credentials": [{"type": "password", "value": "alice", "temporary": False}]}],
    }
    return [realm, other]


def keycloak_home() -> str:
    """Fetch (once) and unpack the pinned Keycloak; skip -- or fail under CI -- if impossible."""
    proc = subprocess.run(["bash", str(KC_DIR / "fetch.sh")], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        msg = f"Keycloak unavailable: deployments/keycloak/fetch.sh failed:\n{proc.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return proc.stdout.strip().splitlines()[-1]


def write_realms(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in realms_for_tests():
        path = directory / f"{r['realm']}-realm.json"
        path.write_text(json.dumps(r, indent=1))
        paths.append(path)
    return paths


@dataclass
class KeycloakHandle(TokenCalls):
    base: str
    service: Service | None = None
    started_in: float | None = None  # seconds from process start to ready (None if reused)

    @property
    def issuer(self) -> str:
        return f"{self.base}/realms/{REALM}"

    @property
    def other_issuer(self) -> str:
        return f"{self.base}/realms/{OTHER_REALM}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    def oidc(self, endpoint: str, realm: str = REALM) -> str:
        return f"{self.base}/realms/{realm}/protocol/openid-connect/{endpoint}"

    def other_realm_token(self, user: str = "alice") -> str:
        r = httpx.post(self.oidc("token", OTHER_REALM), data={
            "grant_type": "password", "client_id": "visitflow-cli", "username": user, "password": user}, timeout=10)
        r.raise_for_status()
        return r.json()["access_token"]

    def logout(self, refresh_token: str, client_id: str = "visitflow-cli") -> httpx.Response:
        """End the user session the refresh token belongs to (OIDC logout, back channel)."""
        return httpx.post(self.oidc("logout"), data={"client_id": client_id, "refresh_token": refresh_token},
                          timeout=10)

    def admin_token(self) -> str:
        r = httpx.post(f"{self.base}/realms/master/protocol/openid-connect/token", data={
            "grant_type": "password", "client_id": "admin-cli", "username": ADMIN[0], "password": ADMIN[1]},
            timeout=10)
        r.raise_for_status()
        return r.json()["access_token"]

    def user_id(self, username: str) -> str:
        r = httpx.get(f"{self.base}/admin/realms/{REALM}/users", params={"username": username, "exact": "true"},
                      headers={"Authorization": f"Bearer {self.admin_token()}"}, timeout=10)
        r.raise_for_status()
        return r.json()[0]["id"]

    def rss_kib(self) -> int | None:
        """Resident memory of the Keycloak JVM (the process group's java), if we started it."""
        if self.service is None or self.service.pid is None:
            return None
        out = subprocess.run(["ps", "-o", "rss=,comm=", "-g", str(self.service.pid)], capture_output=True, text=True)
        return sum(int(line.split()[0]) for line in out.stdout.splitlines() if "java" in line) or None


def start_keycloak(tmp: Path, *, timeout: float = 900.0) -> KeycloakHandle:
    home = keycloak_home()
    port, mgmt = free_port(), free_port()
    realms = write_realms(tmp / "realms")
    t0 = time.monotonic()
    service = start_service(
        "keycloak", ["bash", str(KC_DIR / "start.sh"), str(tmp / "home"), str(port), str(mgmt), *map(str, realms)],
        log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{mgmt}/health/ready",
        env={"KEYCLOAK_HOME": home},
    )
    try:
        service.wait_ready(timeout=timeout, interval=1.0)
    except Exception:
        service.stop()
        raise
    handle = KeycloakHandle(f"http://127.0.0.1:{port}", service, time.monotonic() - t0)
    _wait_for_realm(handle)
    return handle


def _wait_for_realm(handle: KeycloakHandle, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{handle.issuer}/.well-known/openid-configuration", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"realm {REALM} not served at {handle.issuer}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory):
    url = os.environ.get("VISITFLOW_TEST_KEYCLOAK_URL")
    if url:
        handle = KeycloakHandle(url.rstrip("/"))
        _wait_for_realm(handle)
        yield handle
        return
    handle = start_keycloak(tmp_path_factory.mktemp("keycloak"))
    yield handle
    handle.service.stop(timeout=30)


def main(argv: list[str]) -> None:
    """``python -m tests.keycloak_fixtures DIR PORT``: run a test Keycloak in the foreground,
    for VISITFLOW_TEST_KEYCLOAK_URL=http://127.0.0.1:PORT (management port PORT+1)."""
    directory, port = Path(argv[0]), int(argv[1])
    realms = write_realms(directory / "realms")
    os.environ.setdefault("KEYCLOAK_HOME", keycloak_home())
    os.execvp("bash", ["bash", str(KC_DIR / "start.sh"), str(directory / "home"), str(port), str(port + 1),
                       *map(str, realms)])


if __name__ == "__main__":
    main(sys.argv[1:])
