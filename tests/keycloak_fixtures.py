"""The ``keycloak`` fixture: a real Keycloak 26 (dev mode, loopback) with our realm imported.

Started once per session by ``deployments/keycloak/start.sh`` (the distribution comes from
``deployments/keycloak/fetch.sh``, cached outside the checkout) on random loopback ports with a
fresh data directory, so every session starts from an empty database holding exactly:

* ``visitflow`` — ``deployments/keycloak/realm.json`` as shipped, plus two *test-only* clients:
  ``tests-short-lived`` (public, password grant, 5 s access tokens for tiled: the "expired"
  case) and nothing else; the shipped clients are untouched;
* ``elsewhere`` — another realm with the same client names and user ``alice``: its tokens
  look right and carry ``aud: tiled`` but come from another issuer with other keys;
* ``facility`` — the identity-only realm of the token-service topology (the ``opa`` suite's
  facility IdP): :func:`visitflow.production.keycloak_identity.identity_realm` of the shipped
  realm (so realm.json stays the one owner of its content), plus the test-only user ``dave``
  (beamline staff in ``deployments/opa/data.json``) and the short-lived test client.

One Keycloak serves the ``keycloak`` and ``opa`` suites of a session (the fixture is
session-scoped; the realms are independent).

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.idp_fixtures import TokenCalls
from visitflow.token_service.keys import new_rsa_key
from visitflow.stack.services import Service, free_port, start_service

REPO = Path(__file__).resolve().parents[1]
KC_DIR = REPO / "deployments" / "keycloak"
REALM = "visitflow"
OTHER_REALM = "elsewhere"
FACILITY_REALM = "facility"
SHORT_CLIENT = "tests-short-lived"
SHORT_LIFESPAN = 5
ADMIN = ("admin", "admin")  # dev-mode bootstrap admin of the throwaway instance


def _audience_mapper(aud: str) -> dict:
    return {"name": f"audience {aud}", "protocol": "openid-connect", "protocolMapper": "oidc-audience-mapper",
            "consentRequired": False,
            "config": {"included.client.audience": aud, "access.token.claim": "true",
                       "introspection.token.claim": "true", "id.token.claim": "false"}}


def _with_short_lived_client(realm: dict) -> dict:
    cli = next(c for c in realm["clients"] if c["clientId"] == "visitflow-cli")
    short = copy.deepcopy(cli)
    short.update(clientId=SHORT_CLIENT, name=SHORT_CLIENT,
                 description="TESTS ONLY: access tokens expire after a few seconds")
    short["attributes"] = {**short["attributes"], "access.token.lifespan": str(SHORT_LIFESPAN)}
    realm["clients"].append(short)
    return realm


def facility_realm() -> dict:
    """The shipped identity-only realm, ``deployments/keycloak/realm-facility.json`` (kept equal
    to ``identity_realm(realm.json)`` by tests/test_keycloak_identity_realm.py), + test user
    dave and the short-lived client."""
    realm = _with_short_lived_client(json.loads((KC_DIR / "realm-facility.json").read_text()))
    realm["realm"] = FACILITY_REALM
    carol = next(u for u in realm["users"] if u["username"] == "carol")
    dave = copy.deepcopy(carol)
    dave.update(username="dave", firstName="Dave", email="dave@example.org",
                credentials=[{"type": "password", "value": "dave", "temporary": False}])
    realm["users"].append(dave)
    return realm


def realms_for_tests() -> list[dict]:
    """The realms a test Keycloak imports: ours (+ one test-only client), a stranger, and
    the facility's identity-only realm."""
    realm = _with_short_lived_client(json.loads((KC_DIR / "realm.json").read_text()))

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
    return [realm, other, facility_realm()]


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
class KeycloakRealm(TokenCalls):
    """One realm of the test Keycloak, as a facility IdP: logins, and the raw material for
    forged tokens (its real ``kid`` and public key; its private key never leaves Keycloak)."""

    base: str
    realm: str
    other_key: object = field(default_factory=new_rsa_key)

    @property
    def issuer(self) -> str:
        return f"{self.base}/realms/{self.realm}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    def sub(self, user: str) -> str:
        """The user's ``sub`` in this realm (a Keycloak id, not the username)."""
        return jwt.decode(self.token(user), options={"verify_signature": False})["sub"]

    def signing_key(self):
        """``(kid, public key)`` of the realm's RS256 signing key, from its JWKS."""
        keys = httpx.get(f"{self.issuer}/protocol/openid-connect/certs", timeout=10).json()["keys"]
        jwk = next(k for k in keys if k.get("use") == "sig" and k.get("alg") == "RS256")
        return jwk["kid"], jwt.PyJWK(jwk).key

    def public_pem(self) -> bytes:
        return self.signing_key()[1].public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def forge(self, claims: dict, key=None, algorithm: str = "RS256", headers: dict | None = None) -> str:
        """``claims`` signed by someone else (``key``, default :attr:`other_key`) under the realm's kid."""
        hdr = {"kid": self.signing_key()[0], "typ": "at+jwt", **(headers or {})}
        return jwt.encode(claims, key if key is not None else self.other_key, algorithm=algorithm, headers=hdr)


@dataclass
class KeycloakHandle(KeycloakRealm):
    """The test Keycloak; as a realm, ours (``visitflow``)."""

    realm: str = REALM
    service: Service | None = None
    started_in: float | None = None  # seconds from process start to ready (None if reused)

    @property
    def other_issuer(self) -> str:
        return f"{self.base}/realms/{OTHER_REALM}"

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

    def realm_handle(self, realm: str) -> KeycloakRealm:
        return KeycloakRealm(self.base, realm)

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
    handle = KeycloakHandle(f"http://127.0.0.1:{port}", service=service, started_in=time.monotonic() - t0)
    wait_for_realm(handle.issuer)
    return handle


def wait_for_realm(issuer: str, timeout: float = 60.0) -> None:
    """Until the realm's discovery document is served (a reused Keycloak must have been
    started with :func:`realms_for_tests`, e.g. by ``python -m tests.keycloak_fixtures``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"realm not served at {issuer}: was this Keycloak started with "
                               "tests/keycloak_fixtures.py's realms?")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory):
    url = os.environ.get("VISITFLOW_TEST_KEYCLOAK_URL")
    if url:
        handle = KeycloakHandle(url.rstrip("/"))
        wait_for_realm(handle.issuer)
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
