"""The facility topology for ``python -m benchmarks.facility``: the servers of
tests/production/test_facility_story.py, with every database on PostgreSQL.

* the facility IdP: Keycloak's realm ``facility`` (deployments/keycloak/realm-facility.json).
  ``production`` (the default): Keycloak ``start --optimized`` on PostgreSQL, TLS only
  (tests/fixtures/keycloak_production.py, as the keycloak and facility suites start it), the shipped realm byte for byte plus, through the admin API after the import, the
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

Which hops are TLS: :data:`HOPS`.  With ``production`` every one: one CA is made for the run
(:func:`tests.fixtures.keycloak_production.ca_and_cert`, ``<tmp>/ca``) and signs a certificate
per server (``localhost`` + ``127.0.0.1``): Keycloak (``--https-certificate-file``), PostgreSQL
(start-local.sh's PG_TLS_CERT/PG_TLS_KEY: TCP logins TLS only), OPA (``--tls-cert-file``), the
token service and Tiled (``--ssl-certfile/--ssl-keyfile``), Prefect's API (uvicorn's
``--ssl-certfile``, :func:`visitflow.stack.prefect.server_command`).  Every client verifies
against that CA only: HTTP clients through ``SSL_CERT_FILE`` (httpx, OpenSSL's default paths for
PyJWT and websockets) and ``PREFECT_API_SSL_CERT_FILE`` (Prefect's client), PostgreSQL clients
with ``sslmode=verify-full`` (libpq and JDBC URLs name the CA; asyncpg's ``ssl=verify-full`` takes
it from ``PGSSLROOTCERT``).  These are set in this process's environment while the topology is
up, so every server, the worker and its flow runs inherit them; they are harmless to the plain
local stack started beside it (its PostgreSQL URLs ask for no TLS, and a root CA is only read by
verify modes).  ``dev`` is the facility story's topology unchanged: no TLS hop at all.
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

__all__ = ["IDP_MODES", "HOPS", "TLS_SERVERS", "hops", "RunTLS", "run_tls", "Facility", "facility_topology",
           "keycloak_overlay", "database_tls"]

IDP_MODES = ("production", "dev")
REALM = "facility"
OVERLAY_CLIENT = "bench-password-login"   # benchmark only: the shipped realm has no password grant

#: (hop, who talks to whom, TLS with the production IdP?, TLS with the dev IdP?)
HOPS = (
    ("user login", "benchmark (as blueapi's user) → Keycloak token endpoint", True, False),
    ("subject-token check", "token service → Keycloak discovery + JWKS", True, False),
    ("user-token check", "Tiled → Keycloak discovery + JWKS", True, False),
    ("exchange", "trigger → token service (T_user → T_grant)", True, False),
    ("authority", "token service → OPA, Tiled → OPA", True, False),
    ("flow run's token", "flow run → token service (T_grant → T_data, refresh)", True, False),
    ("data", "scan writer, flow run, watcher → Tiled (HTTP and websocket)", True, False),
    ("orchestration", "trigger, worker, flow run → Prefect API", True, False),
    ("databases", "Keycloak, token service, Tiled, Prefect → PostgreSQL", True, False),
)

#: the servers that get a certificate from the run's CA (Keycloak makes its own from it)
TLS_SERVERS = ("postgres", "opa", "token-service", "tiled", "prefect")


def hops(idp: str) -> list[tuple[str, str, str]]:
    """(hop, parties, "TLS" or "plain HTTP"/"plain TCP") for a run with IdP mode ``idp``."""
    if idp not in IDP_MODES:
        raise ValueError(f"idp must be one of {IDP_MODES}, not {idp!r}")
    out = []
    for name, parties, tls_prod, tls_dev in HOPS:
        tls = tls_prod if idp == "production" else tls_dev
        if name == "databases":
            transport = "TLS (verify-full; plain logins refused)" if tls else "plain TCP (no TLS)"
        else:
            transport = "TLS" if tls else "plain HTTP"
        out.append((name, parties, transport))
    return out


@dataclass(frozen=True)
class RunTLS:
    """The run's CA and a certificate for each of :data:`TLS_SERVERS` (PEM files in ``ca_dir``)."""

    ca_dir: Path
    pairs: dict

    @property
    def ca(self) -> Path:
        return self.ca_dir / "ca.pem"

    def pair(self, server: str) -> tuple[Path, Path]:
        return self.pairs[server]

    def client_env(self) -> dict[str, str]:
        """What every client process of the run verifies the servers with (module docstring)."""
        return {"SSL_CERT_FILE": str(self.ca), "PREFECT_API_SSL_CERT_FILE": str(self.ca),
                "PGSSLROOTCERT": str(self.ca)}


def run_tls(ca_dir: Path) -> RunTLS:
    """One CA for the run and a server certificate (``localhost``, ``127.0.0.1``) per server."""
    from tests.fixtures.keycloak_production import ca_and_cert, server_cert

    ca_and_cert(ca_dir)
    return RunTLS(ca_dir, {name: server_cert(ca_dir, ("localhost",), ("127.0.0.1",), stem=name)
                           for name in TLS_SERVERS})


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
def _idp(mode: str, tmp: Path, log, tls: RunTLS | None = None):
    """Yield (issuer, token_url, login client id, alice's password) of the facility IdP."""
    if mode == "production":
        from tests.fixtures.keycloak_production import production_keycloak

        with production_keycloak(tmp / "keycloak", ca_dir=tls.ca_dir, db_ca=tls.ca) as kc:
            password = secrets.token_urlsafe(12)
            keycloak_overlay(kc, password)
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


def _token_service(tmp: Path, issuer: str, opa_url: str, database_url: str, tls: tuple[Path, Path] | None = None):
    """deployments/token-service.yaml as shipped (state in PostgreSQL) with this run's IdP and OPA;
    ``tls`` (certificate, key): HTTPS only, its issuer ``https://127.0.0.1:PORT``."""
    from tests.fixtures.federation_fixtures import TS_ENV, TokenServiceHandle, token_service_config
    from visitflow.stack.services import free_port, start_service

    tmp.mkdir(parents=True, exist_ok=True)
    config = token_service_config(issuer, opa_url, cache_seconds=5.0, shared_state=True)
    path = tmp / "token-service.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**TS_ENV, config["state"]["database_url_env"]: database_url}
    scheme = "https" if tls else "http"
    argv = [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(path), "--port", str(port),
            "--log-level", "warning"]
    if tls:
        argv += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
    service = start_service("token-service", argv, log_dir=tmp / "logs",
                            health_url=f"{scheme}://127.0.0.1:{port}/health", env=env)
    try:
        service.wait_ready(timeout=90)
    except Exception:
        service.stop()
        raise
    return TokenServiceHandle(f"{scheme}://127.0.0.1:{port}", None, service, config_path=path, port=port)


@contextlib.contextmanager
def facility_topology(tmp: Path, idp: str = "production", log=print, info: dict | None = None):
    """Bring the topology up (module docstring); yield a :class:`Facility`; stop everything.
    ``info`` (the run's results for this side) gets ``hops`` and, with TLS, ``database_tls``:
    PostgreSQL's own count of TLS sessions (``pg_stat_ssl``) once everything is up and again
    before it is stopped."""
    info = {} if info is None else info
    from tests.fixtures.federation_fixtures import TS_SECRETS
    from tests.fixtures.opa_fixtures import start_opa
    from tests.fixtures.prefect_fixtures import running_prefect
    from tests.fixtures.tiled_fixtures import VISITS, start_tiled
    from visitflow.core.tiled_admin import admin_auth, ensure_visits
    from visitflow.stack import prefect as pstack

    from benchmarks import measures

    if idp not in IDP_MODES:
        raise ValueError(f"idp must be one of {IDP_MODES}, not {idp!r}")
    tls = run_tls(tmp / "ca") if idp == "production" else None
    pair = tls.pair if tls else (lambda server: None)
    saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "PREFECT_API_SSL_CERT_FILE", "PGSSLROOTCERT",
                                            "VISITFLOW_TEST_POSTGRES_URL")}
    with contextlib.ExitStack() as stack:
        stack.callback(_restore, saved)
        if tls:   # before any server starts: every process of the run inherits them
            os.environ.update(tls.client_env())
            log(f"facility: TLS on every hop, one CA for the run ({tls.ca})")
        pg = stack.enter_context(throwaway_cluster(log, tls=(*tls.pair("postgres"), tls.ca) if tls else None))
        if pg is None:
            raise RuntimeError("the facility topology needs PostgreSQL (deployments/postgres/start-local.sh)")
        os.environ["VISITFLOW_TEST_POSTGRES_URL"] = pg   # production Keycloak's database is made there
        log(f"facility: Keycloak ({idp} mode) starting (60-150 s on 2 cores)...")
        issuer, token_url, client_id, password = stack.enter_context(_idp(idp, tmp, log, tls))
        log(f"facility: IdP {issuer}")
        opa = start_opa(tmp / "opa", tls=pair("opa"))
        stack.callback(opa.service.stop)
        stack.callback(opa.proxy.close)
        ts = _token_service(tmp / "token-service", issuer, opa.direct_url,
                            create_database(pg, "visitflow_tokens", "postgresql+asyncpg"), tls=pair("token-service"))
        stack.callback(ts.service.stop)
        log(f"facility: token service {ts.issuer} (state in PostgreSQL), OPA {opa.direct_url}")
        tiled = start_tiled(ts, tmp / "tiled", tls=pair("tiled"), extra_args=(
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
            database_url=create_database(pg, "prefect", "postgresql+asyncpg"), guarded=True,
            tls=pair("prefect"), ca=tls.ca if tls else None))
        pstack.run_cli(["work-pool", "set-concurrency-limit", pstack.POOL, "20"], prefect.env)  # P7: 20 at once
        measures.deploy_probe(prefect.api, pstack.POOL)
        log(f"facility: Prefect {prefect.api_url} (PostgreSQL) + warm worker")
        info["hops"] = hops(idp)
        if tls:
            info["database_tls"] = {"up": database_tls(pg)}
            log(f"facility: PostgreSQL sessions over TCP: {info['database_tls']['up']}")
        facility = Facility(idp, issuer, token_url, ts.issuer, tiled.uri, prefect.api,
                            prefect.env["PREFECT_API_AUTH_STRING"], password, tmp, client_id=client_id)
        stack.callback(facility.http.close)
        try:
            yield facility
        finally:
            if tls:
                info["database_tls"]["end"] = database_tls(pg)


def database_tls(cluster_url: str) -> str:
    """How many of the cluster's TCP sessions now are TLS (``pg_stat_ssl``), as a sentence."""
    import subprocess

    out = subprocess.run(["psql", "-At", cluster_url, "-c",
                          "SELECT count(*) FILTER (WHERE s.ssl), count(*), string_agg(DISTINCT s.version, ',') "
                          "FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    tls_n, total, versions = out.split("|")
    return f"{tls_n} of {total} TLS ({versions or 'none'})"


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
