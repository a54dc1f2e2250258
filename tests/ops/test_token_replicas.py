"""The token service on two replicas behind nginx, sharing one real PostgreSQL (issue 21 item 4).

deployments/token-service.yaml as shipped — its ``state`` block included (``kind: postgres``,
``poll_seconds: 1``, ``key_publish_ahead: 5``) — with this suite's facility IdP and OPA; both
replicas run ``visitflow idp`` with the same issuer (the load balancer's URL), nginx with
:func:`visitflow.production.token_lb.nginx_config`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
import yaml

from tests.fixtures.federation_fixtures import TS_ENV, TS_SECRETS, TokenServiceHandle, token_service_config
from tests.fixtures.idp_fixtures import REFRESH_TOKEN_TYPE, TOKEN_EXCHANGE
from tests.fixtures.postgres_fixtures import db_url, fetch, fresh_databases
from tests.ops.conftest import scrape, total
from tests.ops.test_runbooks import run_runbook
from visitflow.stack.services import Service, free_port, start_service

pytestmark = pytest.mark.ops

GRANT_SCOPE = "run:saxs_average:a1 read:raw:a1/{run} write:processed:a1/{run}"
DATA_SCOPE = "read:raw:a1/{run} write:processed:a1/{run}"
SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[2] / "deployments/token-service.yaml").read_text())
DB_ENV = SHIPPED["state"]["database_url_env"]
POLL = float(SHIPPED["state"]["poll_seconds"])
PUBLISH_AHEAD = float(SHIPPED["state"]["key_publish_ahead"])


@dataclass
class Replicas:
    lb: TokenServiceHandle                  # through nginx: what callers use
    replicas: list[TokenServiceHandle]      # A and B directly
    config_path: Path
    env: dict
    argv: list[list[str]]
    log_dir: Path
    nginx: Service = None
    measured: dict = field(default_factory=dict)

    def spawn(self, i: int) -> Service:
        port = self.argv[i][self.argv[i].index("--port") + 1]
        return start_service(f"replica-{'ab'[i]}", self.argv[i], log_dir=self.log_dir,
                             health_url=f"http://127.0.0.1:{port}/healthz", env=self.env)

    def kill(self, i: int) -> None:
        """SIGKILL: no shutdown, requests in flight die with it."""
        os.killpg(self.replicas[i].service.pid, signal.SIGKILL)
        self.replicas[i].service.process.wait(timeout=30)

    def restart(self, i: int) -> None:
        self.replicas[i].service = self.spawn(i)
        self.replicas[i].service.wait_ready(timeout=90)

    def introspect(self, i: int, token: str) -> dict:
        r = httpx.post(f"{self.replicas[i].issuer}/introspect", data={"token": token},
                       auth=("tiled", TS_SECRETS["tiled"]), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


def _handle(url: str, service: Service | None) -> TokenServiceHandle:
    return TokenServiceHandle(url, None, service)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, ops_idp, ops_opa):
    from visitflow.production.token_lb import nginx_config

    tmp = tmp_path_factory.mktemp("replicas")
    with fresh_databases("tokens") as names:
        lb_port, ports = free_port(), [free_port(), free_port()]
        issuer = f"http://127.0.0.1:{lb_port}"
        config_path = tmp / "token-service.yaml"
        config_path.write_text(yaml.safe_dump(token_service_config(ops_idp.issuer, ops_opa.url, shared_state=True)))
        env = {**TS_ENV, DB_ENV: db_url(names["tokens"])}
        argv = [[sys.executable, "-m", "visitflow.cli", "idp", "--config", str(config_path), "--port", str(p),
                 "--issuer", issuer, "--log-level", "warning"] for p in ports]
        rs = Replicas(_handle(issuer, None), [], config_path, env, argv, tmp / "logs")
        services = [rs.spawn(0), rs.spawn(1)]       # at once: both create the schema / first key
        for s in services:
            s.wait_ready(timeout=90)
        rs.replicas = [_handle(f"http://127.0.0.1:{p}", s) for p, s in zip(ports, services)]
        (tmp / "nginx-tmp").mkdir()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_config(tmp, f"127.0.0.1:{lb_port}", [f"127.0.0.1:{p}" for p in ports]))
        nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
        rs.nginx = start_service("nginx", [nginx, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
                                 log_dir=tmp / "logs", health_url=f"{issuer}/healthz")
        rs.nginx.wait_ready(timeout=60)
        try:
            yield rs
        finally:
            rs.nginx.stop()
            for r in rs.replicas:
                r.service.stop()


def _grant(ts: TokenServiceHandle, alice: str, run: str | None = None) -> str:
    return ts.exchange(alice, "blueapi", audience="visitflow",
                       scope=GRANT_SCOPE.format(run=run or uuid.uuid4().hex))["access_token"]


def _refresh(ts: TokenServiceHandle, token: str) -> httpx.Response:
    return ts.post({"grant_type": "refresh_token", "refresh_token": token},
                   auth=("visitflow", TS_SECRETS["visitflow"]))


def test_both_replicas_share_one_issuer_one_jwks_and_are_ready_on_the_database(two_replicas):
    a, b = two_replicas.replicas
    ja, jb = (httpx.get(f"{r.issuer}/jwks", timeout=30).json() for r in (a, b))
    assert {k["kid"] for k in ja["keys"]} == {k["kid"] for k in jb["keys"]} != set()
    for r in (a, b):
        ready = httpx.get(f"{r.issuer}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert "postgresql answers" in ready.text, ready.text
        discovery = httpx.get(f"{r.issuer}/.well-known/openid-configuration", timeout=30).json()
        assert discovery["issuer"] == two_replicas.lb.issuer


def test_replicas_starting_on_an_empty_database_together_make_one_first_key():
    """Each store finds ``vf_signing_keys`` empty; exactly one key is made and all publish it.

    (The stop-25 CI run: each replica made its own first key, and A's JWKS lacked B's.)
    """
    from visitflow.token_service.pg_keys import SharedKeyStore
    from visitflow.token_service.pg_state import PostgresState

    with fresh_databases("keys") as names:
        states = [PostgresState(db_url(names["keys"])) for _ in range(4)]   # schema made before the race
        try:
            start, stores, errors = threading.Barrier(len(states)), [None] * len(states), []

            def make(i):
                try:
                    start.wait(timeout=30)
                    stores[i] = SharedKeyStore(states[i], poll_seconds=POLL, publish_ahead=PUBLISH_AHEAD)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=make, args=(i,)) for i in range(len(states))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not errors, errors
            rows = fetch(names["keys"], "SELECT kid FROM vf_signing_keys")
            assert len(rows) == 1, rows
            for store in stores:
                assert [k["kid"] for k in store.jwks()["keys"]] == [rows[0]["kid"]]
                assert store.current.kid == rows[0]["kid"]
        finally:
            for st in states:
                st.close()


def test_a_revocation_at_one_replica_is_refused_at_the_other_after_the_poll_bound(two_replicas, ops_idp):
    a, b = two_replicas.replicas
    grant = _grant(a, ops_idp.token("alice"))
    assert two_replicas.introspect(1, grant)["active"] is True          # B knows nothing of it yet
    assert a.revoke(grant, "blueapi").status_code == 200
    revoked_at = time.monotonic()
    # the bound: B re-reads the revocations before answering once its last read is POLL old
    seen = None
    while seen is None:
        if two_replicas.introspect(1, grant) == {"active": False}:
            seen = time.monotonic() - revoked_at
        elif time.monotonic() - revoked_at > POLL + 30:
            pytest.fail(f"B still accepts the revoked grant {POLL + 30:.0f} s after A revoked it")
    two_replicas.measured["revocation_seen_at_b_s"] = seen
    print(f"\nrevocation at A refused at B after {seen:.3f} s (poll_seconds {POLL})")
    time.sleep(POLL)   # whatever B's poll phase was, now it must have read the revocation
    assert two_replicas.introspect(1, grant) == {"active": False}
    r = b.exchange_response(grant, "visitflow", audience="tiled", scope=DATA_SCOPE.format(run="x"))
    assert r.status_code == 401 and "revoked" in r.json()["error_description"], r.text


def test_a_refresh_issued_by_a_is_redeemed_at_b_and_its_reuse_at_a_revokes_the_family(two_replicas, ops_idp):
    a, b = two_replicas.replicas
    run = uuid.uuid4().hex
    grant = _grant(a, ops_idp.token("alice"), run)
    data = a.exchange(grant, "visitflow", audience="tiled", scope=DATA_SCOPE.format(run=run), refresh=True)
    first = data["refresh_token"]
    at_b = _refresh(b, first)
    assert at_b.status_code == 200, at_b.text                        # A's refresh token, redeemed at B
    second = at_b.json()["refresh_token"]
    reused = _refresh(a, first)                                      # the rotated one again: a copy
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant", reused.text
    after = _refresh(b, second)                                      # the family is gone at B too
    assert after.status_code == 400 and "revoked" in after.json()["error_description"], after.text
    time.sleep(POLL)
    for i in (0, 1):   # the family's access tokens too, at both replicas
        assert two_replicas.introspect(i, at_b.json()["access_token"]) == {"active": False}
        assert two_replicas.introspect(i, second) == {"active": False}


def test_two_replicas_racing_on_one_refresh_token_let_exactly_one_win(two_replicas, ops_idp):
    a, b = two_replicas.replicas
    run = uuid.uuid4().hex
    grant = _grant(a, ops_idp.token("alice"), run)
    token = a.exchange(grant, "visitflow", audience="tiled", scope=DATA_SCOPE.format(run=run),
                       refresh=True)["refresh_token"]
    results = {}
    go = threading.Barrier(2)

    def redeem(i):
        go.wait()
        results[i] = _refresh(two_replicas.replicas[i], token).status_code

    threads = [threading.Thread(target=redeem, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results.values()) == [200, 400], results


def test_a_key_rotation_fails_no_validation_at_either_replica_nor_at_a_jwks_client(two_replicas, ops_idp):
    """Tokens minted through nginx all through a rotation (the runbook's command) validate at
    both replicas (introspection) and at a relying party holding a JWKS fetched before
    (visitflow's TokenValidator, as Tiled and the worker validate: refetch on an unknown kid
    at most every 5 s — less than ``key_publish_ahead``)."""
    from visitflow.core.tokens import TokenValidator
    from visitflow.errors import InvalidToken

    a, b = two_replicas.replicas
    alice = ops_idp.token("alice")
    relying = TokenValidator(two_replicas.lb.issuer, "visitflow", jwks_uri=f"{two_replicas.lb.issuer}/jwks")
    old_kids = {k["kid"] for k in httpx.get(f"{a.issuer}/jwks", timeout=30).json()["keys"]}
    tokens, failures, stop = [], [], threading.Event()

    def mint_and_check():
        while not stop.is_set():
            grant = _grant(two_replicas.lb, alice)
            tokens.append(grant)
            for i in (0, 1):
                if two_replicas.introspect(i, grant).get("active") is not True:
                    failures.append((i, jwt.get_unverified_header(grant)["kid"]))
            try:
                relying.validate(grant)
            except InvalidToken as exc:
                seen = [sorted(k["kid"] for k in httpx.get(f"{r.issuer}/jwks", timeout=30).json()["keys"])
                        for r in (two_replicas.lb, a, b)]
                failures.append(("jwks-client", repr(exc), seen))

    database = urlsplit(two_replicas.env[DB_ENV]).path.lstrip("/")
    fetch(database, "INSERT INTO vf_revocations (kind, id, exp, at) VALUES ('jti', 'long-expired', 1, 1)")
    worker = threading.Thread(target=mint_and_check)
    worker.start()
    try:
        out = run_runbook("replica-key-rotation", {**two_replicas.env, "CONFIG": two_replicas.config_path,
                                                   "TS": two_replicas.lb.issuer})
        new_kids = {k["kid"] for k in httpx.get(f"{b.issuer}/jwks", timeout=30).json()["keys"]} - old_kids
        assert len(new_kids) == 1 and out.splitlines()[-1] == f"{len(old_kids) + 1} keys published", out
        (new_kid,) = new_kids
        time.sleep(PUBLISH_AHEAD + POLL)          # the new key signs from now on, everywhere
        before = len(tokens)
        deadline = time.monotonic() + 120
        while len(tokens) < before + 4 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(120)
    assert failures == [], failures
    assert fetch(database, "SELECT id FROM vf_revocations WHERE id = 'long-expired'") == []   # housekeeping
    kids = [jwt.get_unverified_header(t)["kid"] for t in tokens]
    assert kids[-1] == new_kid and set(kids[:1]) <= old_kids, kids
    for r in (a, b):                                  # both keys published: the old one overlaps
        assert old_kids | {new_kid} <= {k["kid"] for k in httpx.get(f"{r.issuer}/jwks", timeout=30).json()["keys"]}
    two_replicas.measured["rotation_validations"] = 3 * len(tokens)
    print(f"\nkey rotation: {len(tokens)} tokens minted, {3 * len(tokens)} validations, 0 failed")


def test_a_replica_killed_during_a_burst_of_exchanges_refuses_no_exchange(two_replicas, ops_idp):
    """SIGKILL of A while 4 callers exchange through nginx: every exchange succeeds (nginx
    retries the other replica), and B served only part of the burst (A served the rest)."""
    b = two_replicas.replicas[1]
    alice = ops_idp.token("alice")
    counter = 'visitflow_token_requests_total'
    b_before = total(scrape(f"{b.issuer}/metrics"), counter, client="blueapi", outcome="ok")
    n, callers = 120, 4
    statuses, lock, half = [], threading.Lock(), threading.Event()

    def caller(k):
        for _ in range(k, n, callers):
            r = two_replicas.lb.exchange_response(alice, "blueapi", audience="visitflow",
                                                  scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))
            with lock:
                statuses.append((r.status_code, r.text[:200] if r.status_code != 200 else ""))
                if len(statuses) >= n // 3:
                    half.set()

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    try:
        assert half.wait(300), "the burst did not get a third of the way"
        two_replicas.kill(0)
        killed_after = len(statuses)
        for t in threads:
            t.join(300)
    finally:
        two_replicas.restart(0)
    refused = [s for s in statuses if s[0] != 200]
    print(f"\nburst of {n} exchanges, A SIGKILLed after {killed_after}: {n - len(refused)} ok, {len(refused)} refused")
    assert len(statuses) == n and refused == [], refused
    served_by_b = total(scrape(f"{b.issuer}/metrics"), counter, client="blueapi", outcome="ok") - b_before
    assert 0 < served_by_b < n, served_by_b          # A took part before it died
    assert killed_after < n
    # A is back on the same state: it validates B's tokens
    grant = _grant(b, alice)
    assert two_replicas.introspect(0, grant)["active"] is True


def test_the_shared_state_backup_restores_revocations_keys_and_refresh_tokens(two_replicas, ops_idp, tmp_path):
    """runbook:backup-token-service-pg then restore into a new database: a replica on it
    knows the revocations and validates the tokens signed before."""
    a = two_replicas.replicas[0]
    alice = ops_idp.token("alice")
    revoked, kept = _grant(a, alice), _grant(a, alice)
    assert a.revoke(revoked, "blueapi").status_code == 200
    url = two_replicas.env[DB_ENV]
    with fresh_databases("restored") as names:
        restored_url = db_url(names["restored"])
        run_runbook("backup-token-service-pg", {"DATABASE_URL": url, "BACKUP": tmp_path})
        run_runbook("restore-token-service-pg", {"DATABASE_URL": restored_url, "BACKUP": tmp_path})
        port = free_port()
        argv = [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(two_replicas.config_path),
                "--port", str(port), "--issuer", two_replicas.lb.issuer, "--log-level", "warning"]
        service = start_service("replica-restored", argv, log_dir=tmp_path / "logs",
                                health_url=f"http://127.0.0.1:{port}/healthz",
                                env={**two_replicas.env, DB_ENV: restored_url})
        try:
            service.wait_ready(timeout=90)
            check = lambda t: httpx.post(f"http://127.0.0.1:{port}/introspect", data={"token": t},  # noqa: E731
                                         auth=("tiled", TS_SECRETS["tiled"]), timeout=30).json()
            assert check(revoked) == {"active": False}
            assert check(kept)["active"] is True
        finally:
            service.stop()


def test_a_replica_cut_from_the_database_says_503_and_not_ready_then_recovers(two_replicas, ops_idp, tmp_path):
    """A third replica reaching PostgreSQL through a switchable proxy: with the link cut it
    refuses with 503 ``temporarily_unavailable`` (never a 500, never a token it cannot back)
    and its ``/readyz`` names ``state``; with the link back it serves again."""
    from urllib.parse import urlsplit, urlunsplit

    from tests.fixtures.tcp_proxy import SwitchableProxy

    url = urlsplit(two_replicas.env[DB_ENV])
    proxy = SwitchableProxy(url.port, enabled=True)
    via_proxy = urlunsplit((url.scheme, f"{url.netloc.rsplit(':', 1)[0]}:{proxy.port}", url.path, url.query, ""))
    port = free_port()
    argv = [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(two_replicas.config_path),
            "--port", str(port), "--issuer", two_replicas.lb.issuer, "--log-level", "warning"]
    service = start_service("replica-c", argv, log_dir=tmp_path / "logs", health_url=f"http://127.0.0.1:{port}/healthz",
                            env={**two_replicas.env, DB_ENV: via_proxy})
    c = _handle(f"http://127.0.0.1:{port}", service)
    alice = ops_idp.token("alice")
    try:
        service.wait_ready(timeout=90)
        assert c.exchange_response(alice, "blueapi", audience="visitflow",
                                   scope=GRANT_SCOPE.format(run=uuid.uuid4().hex)).status_code == 200
        proxy.cut()
        time.sleep(POLL)                          # its next request re-reads keys and revocations
        r = c.exchange_response(alice, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
        assert "database" in r.json()["error_description"], r.text
        ready = httpx.get(f"{c.issuer}/readyz", timeout=60)
        assert ready.status_code == 503 and "state" in ready.text, ready.text
        proxy.enabled = True
        time.sleep(POLL)
        r = c.exchange_response(alice, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))
        assert r.status_code == 200, r.text
        assert httpx.get(f"{c.issuer}/readyz", timeout=60).status_code == 200
    finally:
        service.stop()
        proxy.close()
