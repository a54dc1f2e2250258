"""The facility topology for ``python -m benchmarks.facility``: the servers of
tests/production/test_facility_story.py, with every database on PostgreSQL.

* the facility IdP: Keycloak's realm ``facility`` (deployments/keycloak/realm-facility.json).
  ``production`` (the default): Keycloak ``start --optimized`` on PostgreSQL, TLS only, from a CA
  made for the run (tests/fixtures/keycloak_production.py, as the keycloak and facility suites
  start it), the shipped realm byte for byte plus, through the admin API after the import, the
  overlay a benchmark needs and a facility's user federation would provide: user ``alice`` and a
  password-grant client with the login client's audience mappers (:func:`keycloak_overlay`).
  ``dev``: the session Keycloak of the ``opa`` suite (dev mode, plain HTTP, the dev overlay's
  users; tests/fixtures/keycloak_fixtures.py) — exactly what the facility story test runs;
* OPA with deployments/opa/ (policy + data), asked directly (not through the suite's outage switch);
* the token service in production mode (deployments/token-service.yaml) with its shipped
  ``state: kind: postgres`` (keys, refresh tokens, revocations in PostgreSQL), trusting the IdP
  through discovery + JWKS and asking OPA for every scope;
* Tiled (``visitflow tiled serve``) trusting the token service for run tokens and the IdP for
  users' own tokens (OPA decides, cached 2 s as in the facility story), catalog, tables and
  principals on PostgreSQL;
* Prefect server on PostgreSQL, guarded by an auth string, with the warm ``visitflow`` worker
  (its own endpoint allow-list) whose flow runs hold the token service's ``visitflow`` secret.

Which hops are TLS: :data:`HOPS` (only the IdP's, and only with ``production``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks.postgres import create_database, throwaway_cluster

__all__ = ["IDP_MODES", "HOPS", "hops", "Facility", "facility_topology", "keycloak_overlay"]

IDP_MODES = ("production", "dev")
REALM = "facility"
OVERLAY_CLIENT = "bench-password-login"   # benchmark only: the shipped realm has no password grant

#: (hop, who talks to whom, TLS with the production IdP?, TLS with the dev IdP?)
HOPS = (
    ("user login", "benchmark (as blueapi's user) → Keycloak token endpoint", True, False),
    ("subject-token check", "token service → Keycloak discovery + JWKS", True, False),
    ("user-token check", "Tiled → Keycloak discovery + JWKS", True, False),
    ("exchange", "trigger → token service (T_user → T_grant)", False, False),
    ("authority", "token service → OPA, Tiled → OPA", False, False),
    ("flow run's token", "flow run → token service (T_grant → T_data, refresh)", False, False),
    ("data", "scan writer, flow run, watcher → Tiled (HTTP and websocket)", False, False),
    ("orchestration", "trigger, worker, flow run → Prefect API", False, False),
    ("databases", "Keycloak, token service, Tiled, Prefect → PostgreSQL", False, False),
)


def hops(idp: str) -> list[tuple[str, str, str]]:
    """(hop, parties, "TLS" or "plain HTTP"/"plain TCP") for a run with IdP mode ``idp``."""
    if idp not in IDP_MODES:
        raise ValueError(f"idp must be one of {IDP_MODES}, not {idp!r}")
    out = []
    for name, parties, tls_prod, tls_dev in HOPS:
        tls = tls_prod if idp == "production" else tls_dev
        plain = "plain TCP (no TLS)" if name == "databases" else "plain HTTP"
        out.append((name, parties, "TLS" if tls else plain))
    return out


@dataclass
class Facility:
    """The running topology: what the measurements need from it."""

    idp: str
    issuer: str                 # the facility IdP's issuer (users' tokens)
    token_url: str
    token_service: str          # the token service's issuer (T_grant, T_data)
    tiled_uri: str
    api: object                 # PrefectAPI of the guarded server
    prefect_auth: str
    password: str
    tmp: Path
    client_id: str = "visitflow-cli"
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=20))

    def alice(self) -> str:
        """A fresh access token of alice from the facility IdP (5-minute tokens: callers ask again)."""
        r = self.http.post(self.token_url, data={"grant_type": "password", "client_id": self.client_id,
                                                 "username": "alice", "password": self.password})
        r.raise_for_status()
        return r.json()["access_token"]

    def root(self, token=None):
        from visitflow.core.tiled_client import BearerAuth, connect

        return connect(self.tiled_uri, BearerAuth((lambda: token) if token else self.alice))

    def trigger(self, state_dir: Path, **settings):
        """blueapi's trigger holding alice's token, exchanging at the token service."""
        from tests.fixtures.federation_fixtures import TS_SECRETS
        from visitflow.trigger import AnalysisTrigger, TriggerSettings

        return AnalysisTrigger(TriggerSettings(issuer=self.token_service, prefect_api_url=self.api.api_url,
                                               prefect_auth_string=self.prefect_auth,
                                               client_secret=TS_SECRETS["blueapi"], state_dir=state_dir,
                                               **settings), token=self.alice())


def keycloak_overlay(kc: dict, password: str) -> None:
    """User alice and :data:`OVERLAY_CLIENT` (the shipped login client ``visitflow-cli`` with the
    password grant on), added through the admin API of the production Keycloak ``kc``
    (tests/fixtures/keycloak_production.py's dict and its overlay); the shipped realm is not changed."""
    from tests.fixtures.keycloak_production import add_test_overlay

    add_test_overlay(kc, {"alice": password}, client_id=OVERLAY_CLIENT, delegate=False,
                     description="BENCHMARK ONLY (benchmarks/facility_topology.py)")


@contextlib.contextmanager
def _idp(mode: str, tmp: Path, log):
    """Yield (issuer, token_url, login client id, alice's password) of the facility IdP."""
    if mode == "production":
        from tests.fixtures.keycloak_production import production_keycloak

        with production_keycloak(tmp / "keycloak") as kc:
            password = secrets.token_urlsafe(12)
            keycloak_overlay(kc, password)
            # every process of the run (token service, Tiled, this one) trusts the run's CA
            os.environ["SSL_CERT_FILE"] = str(kc["ca"])
            issuer = f"{kc['hostname']}/realms/{REALM}"
            yield issuer, f"{issuer}/protocol/openid-connect/token", OVERLAY_CLIENT, password
        return
    from tests.fixtures.keycloak_fixtures import FACILITY_REALM, KeycloakHandle, start_keycloak, wait_for_realm

    url = os.environ.get("VISITFLOW_TEST_KEYCLOAK_URL")
    kc = KeycloakHandle(url.rstrip("/")) if url else start_keycloak(tmp / "keycloak")
    try:
        realm = kc.realm_handle(FACILITY_REALM)
        wait_for_realm(realm.issuer)
        yield realm.issuer, realm.token_url, "visitflow-cli", "alice"
    finally:
        if kc.service is not None:
            kc.service.stop(timeout=30)


def _token_service(tmp: Path, issuer: str, opa_url: str, database_url: str):
    """deployments/token-service.yaml as shipped (state in PostgreSQL) with this run's IdP and OPA."""
    from tests.fixtures.federation_fixtures import TS_ENV, TokenServiceHandle, token_service_config
    from visitflow.stack.services import free_port, start_service

    tmp.mkdir(parents=True, exist_ok=True)
    config = token_service_config(issuer, opa_url, cache_seconds=5.0, shared_state=True)
    path = tmp / "token-service.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**TS_ENV, config["state"]["database_url_env"]: database_url}
    service = start_service("token-service", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(path),
                                              "--port", str(port), "--log-level", "warning"],
                            log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/health", env=env)
    try:
        service.wait_ready(timeout=90)
    except Exception:
        service.stop()
        raise
    return TokenServiceHandle(f"http://127.0.0.1:{port}", None, service, config_path=path, port=port)


@contextlib.contextmanager
def facility_topology(tmp: Path, idp: str = "production", log=print):
    """Bring the topology up (module docstring); yield a :class:`Facility`; stop everything."""
    from tests.fixtures.federation_fixtures import TS_SECRETS
    from tests.fixtures.opa_fixtures import start_opa
    from tests.fixtures.prefect_fixtures import running_prefect
    from tests.fixtures.tiled_fixtures import VISITS, start_tiled
    from visitflow.core.tiled_admin import admin_auth, ensure_visits
    from visitflow.stack import prefect as pstack

    from benchmarks import measures

    if idp not in IDP_MODES:
        raise ValueError(f"idp must be one of {IDP_MODES}, not {idp!r}")
    saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "VISITFLOW_TEST_POSTGRES_URL")}
    with contextlib.ExitStack() as stack:
        stack.callback(_restore, saved)
        pg = stack.enter_context(throwaway_cluster(log))
        if pg is None:
            raise RuntimeError("the facility topology needs PostgreSQL (deployments/postgres/start-local.sh)")
        os.environ["VISITFLOW_TEST_POSTGRES_URL"] = pg   # production Keycloak's database is made there
        log(f"facility: Keycloak ({idp} mode) starting (60-150 s on 2 cores)...")
        issuer, token_url, client_id, password = stack.enter_context(_idp(idp, tmp, log))
        log(f"facility: IdP {issuer}")
        opa = start_opa(tmp / "opa")
        stack.callback(opa.service.stop)
        stack.callback(opa.proxy.close)
        ts = _token_service(tmp / "token-service", issuer, opa.direct_url, create_database(pg, "visitflow_tokens"))
        stack.callback(ts.service.stop)
        log(f"facility: token service {ts.issuer} (state in PostgreSQL), OPA {opa.direct_url}")
        tiled = start_tiled(ts, tmp / "tiled", extra_args=(
            "--user-issuer", issuer, "--authority-url", opa.direct_url, "--authority-cache", "2",
            "--catalog-database", create_database(pg, "tiled_catalog", "postgresql+asyncpg"),
            "--tabular-storage", create_database(pg, "tiled_tables"),
            "--authn-database", create_database(pg, "tiled_authn", "postgresql+asyncpg")))
        stack.callback(tiled.service.stop)
        ensure_visits(tiled.uri, admin_auth(ts.issuer, "visitflow-admin", TS_SECRETS["visitflow-admin"]), VISITS,
                      layout=tiled.layout)
        log(f"facility: Tiled {tiled.uri}")
        prefect = stack.enter_context(running_prefect(
            tmp / "prefect", issuer=ts.issuer, tiled_uri=tiled.uri, client_secret=TS_SECRETS["visitflow"],
            database_url=create_database(pg, "prefect", "postgresql+asyncpg"), guarded=True))
        pstack.run_cli(["work-pool", "set-concurrency-limit", pstack.POOL, "20"], prefect.env)  # P7: 20 at once
        measures.deploy_probe(prefect.api, pstack.POOL)
        log(f"facility: Prefect {prefect.api_url} (PostgreSQL) + warm worker")
        facility = Facility(idp, issuer, token_url, ts.issuer, tiled.uri, prefect.api,
                            prefect.env["PREFECT_API_AUTH_STRING"], password, tmp, client_id=client_id)
        stack.callback(facility.http.close)
        yield facility


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
