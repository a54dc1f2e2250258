"""The ``idp`` fixture: a real dev IdP process on a random loopback port, once per session.

Besides talking OAuth to it, tests can mint arbitrary (mostly bad) tokens with the IdP's
*real* signing key (read from its keys directory) or with a key it has never published.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from visitflow.token_service.keys import KeyStore, new_rsa_key
from visitflow.stack.services import Service, free_port, start_service

REPO = Path(__file__).resolve().parents[1]
IDP_CONFIG = REPO / "deployments" / "idp.yaml"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
SECRETS = {"blueapi": "blueapi-dev-secret", "visitflow": "visitflow-dev-secret",
           "tiled": "tiled-dev-secret", "visitflow-admin": "admin-dev-secret"}


class TokenCalls:
    """OAuth calls a test makes at an IdP's token endpoint (``token_url``): the same for the
    dev IdP and for Keycloak (tests/keycloak_fixtures.py), so tests can send both the same
    requests."""

    token_url: str

    def post(self, form: dict, auth: tuple | None = None) -> httpx.Response:
        return httpx.post(self.token_url, data=form, auth=auth, timeout=10)

    def login(self, user: str, password: str | None = None, scope: str | None = None,
              client_id: str = "visitflow-cli") -> dict:
        form = {"grant_type": "password", "client_id": client_id, "username": user,
                "password": password if password is not None else user}
        if scope is not None:
            form["scope"] = scope
        r = self.post(form)
        r.raise_for_status()
        return r.json()

    def token(self, user: str, password: str | None = None, scope: str | None = None,
              client_id: str = "visitflow-cli") -> str:
        return self.login(user, password, scope, client_id)["access_token"]

    def client_token(self, client_id: str, secret: str | None = None, scope: str | None = None) -> str:
        form = {"grant_type": "client_credentials"}
        if scope:
            form["scope"] = scope
        r = self.post(form, auth=(client_id, secret or SECRETS[client_id]))
        r.raise_for_status()
        return r.json()["access_token"]

    def exchange_response(self, subject_token: str, client_id: str, secret: str | None = None,
                          audience: str | None = None, scope: str | None = None,
                          refresh: bool = False) -> httpx.Response:
        """``refresh=True`` asks for a refresh token too (``requested_token_type``)."""
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject_token,
                "subject_token_type": ACCESS_TOKEN_TYPE}
        if refresh:
            form["requested_token_type"] = REFRESH_TOKEN_TYPE
        if audience:
            form["audience"] = audience
        if scope:
            form["scope"] = scope
        return self.post(form, auth=(client_id, secret or SECRETS[client_id]))

    def exchange(self, subject_token: str, client_id: str, secret: str | None = None,
                 audience: str | None = None, scope: str | None = None, refresh: bool = False) -> dict:
        r = self.exchange_response(subject_token, client_id, secret, audience, scope, refresh)
        assert r.status_code == 200, r.text
        return r.json()

    def delegate(self, user_token: str, visit: str, run: str, analysis: str = "saxs_average") -> tuple[str, str]:
        """The real two-hop path: (T_grant, T_data) for one analysis of one run."""
        grant = self.exchange(user_token, "blueapi", audience="visitflow",
                              scope=f"run:{analysis}:{visit} read:raw:{visit}/{run} write:processed:{visit}/{run}")
        data = self.exchange(grant["access_token"], "visitflow", audience="tiled",
                             scope=f"read:raw:{visit}/{run} write:processed:{visit}/{run}", refresh=True)
        return grant["access_token"], data["access_token"]


@dataclass
class IdPHandle(TokenCalls):
    issuer: str
    keys_dir: Path
    service: Service
    other_key: object = field(default_factory=new_rsa_key)

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    def signing_key(self):
        store = KeyStore(self.keys_dir)
        return store.current.kid, store.current.private_key

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "alice", "aud": ["blueapi", "tiled"], "azp": "visitflow-cli",
                  "exp": now + 300, "iat": now, "nbf": now, "jti": str(uuid.uuid4()),
                  "scope": "read:data:a1 write:data:a1 run:saxs_average:a1"}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict, headers: dict | None = None, key=None, algorithm: str = "RS256") -> str:
        kid, real = self.signing_key()
        hdr = {"kid": kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(claims, key if key is not None else real, algorithm=algorithm, headers=hdr)

    def public_pem(self) -> bytes:
        return self.signing_key()[1].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def start_idp(tmp: Path, config: Path = IDP_CONFIG) -> IdPHandle:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    keys_dir = tmp / "idp-keys"
    KeyStore(keys_dir)  # create the key before the server so tests can sign with it
    service = start_service(
        "idp", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(config),
                "--port", str(port), "--keys-dir", str(keys_dir), "--log-level", "warning"],
        log_dir=tmp / "logs", health_url=f"{issuer}/health",
    )
    service.wait_ready(timeout=60)
    return IdPHandle(issuer, keys_dir, service)


def start_fixed_scopes_idp(tmp: Path) -> IdPHandle:
    """A dev IdP with ``fixed_scopes: true``: Keycloak's exchange rules (visitflow/token_service/keycloak_rules.py)."""
    import yaml

    config = yaml.safe_load(IDP_CONFIG.read_text())
    config["fixed_scopes"] = True
    (tmp / "idp.yaml").write_text(yaml.safe_dump(config))
    return start_idp(tmp, tmp / "idp.yaml")


@pytest.fixture(scope="session")
def idp(tmp_path_factory):
    handle = start_idp(tmp_path_factory.mktemp("idp"))
    yield handle
    handle.service.stop()
