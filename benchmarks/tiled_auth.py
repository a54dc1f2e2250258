"""What does our JWT authentication + path policy cost on a Tiled metadata GET?

Starts a dev IdP and three Tiled servers with identical content (raw/a1/<run> written by
bluesky's TiledWriter) and measures, side by side in interleaved rounds:

* ``apikey``       tiled's single-user API key, no access policy (the cheapest tiled auth);
* ``jwt``          our authenticator (JWT validation) + our access policy (the real setup);
* ``jwt-nopolicy`` our authenticator, no access policy (isolates authentication cost).

(``--memdb`` adds ``jwt-memdb``: tiled's in-memory principals DB, which fails with 500s
under concurrent requests — the reason our config uses a SQLite file.)

Reports the median and p90 latency of sequential keep-alive requests and requests/s with
4 client threads, and writes the table to ``benchmarks/results/tiled_auth.md``.

    python benchmarks/tiled_auth.py [--n 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency_table import interleaved, latency_rows, measure, write_result  # noqa: E402
from visitflow.stack.services import free_port, start_service  # noqa: E402
from visitflow.tiled.config import prepare_state_dir, render_config, write_config  # noqa: E402

API_KEY = "benchsecret0123456789"
MODES = ("apikey", "jwt", "jwt-nopolicy")
SERVE = "import sys, yaml; from visitflow.tiled.server import serve; serve(yaml.safe_load(open(sys.argv[1])), log_level='warning')"


def start_tiled(name, issuer, tmp: Path, mode: str, **config):
    """A Tiled server for one variant (``config``: more :func:`render_config` options)."""
    port = free_port()
    state = prepare_state_dir(tmp / name)
    cfg = render_config(issuer=issuer, state_dir=state, port=port, **config)
    if mode == "apikey":
        cfg.pop("access_control")
        cfg["authentication"] = {"single_user_api_key": API_KEY, "allow_anonymous_access": False}
        cfg.pop("database")
    elif mode == "jwt-nopolicy":
        cfg.pop("access_control")
    elif mode == "jwt-memdb":
        cfg["database"]["uri"] = "sqlite:///file:authdb?mode=memory&cache=shared&uri=true"
    path = write_config(cfg, state / "tiled.yml")
    svc = start_service(name, [sys.executable, "-c", SERVE, str(path)], log_dir=tmp / "logs",
                        health_url=f"http://127.0.0.1:{port}/api/v1/")
    svc.wait_ready(timeout=120)
    return svc, f"http://127.0.0.1:{port}"


def token(issuer, **form):
    r = httpx.post(f"{issuer}/token", data=form["form"], auth=form.get("auth"))
    r.raise_for_status()
    return r.json()["access_token"]


def write_run(uri, bearer: str | None) -> str:
    """One real bluesky run via TiledWriter into raw/a1; returns its uid."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import det, motor
    from tiled.client import from_uri

    from visitflow.core.tiled_client import BearerAuth

    node = f"{uri}/api/v1/metadata/raw/a1"
    c = from_uri(node, api_key=API_KEY) if bearer is None else from_uri(node, auth=BearerAuth(lambda: bearer))
    RE = RunEngine({})
    RE.subscribe(TiledWriter(c))
    (uid,) = RE(bp.scan([det], motor, -1, 1, 5))
    return uid


def throughput(url: str, headers: dict, auth, n: int, threads: int = 4) -> tuple[float, list[str]]:
    """Requests/s of ``threads`` clients; a thread stops at its first error (reported)."""
    errors: list[str] = []

    def work():
        with httpx.Client(headers=headers, auth=auth) as c:
            for _ in range(n // threads):
                r = c.get(url)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:300]}")
                    return

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (n // threads * threads) / (time.perf_counter() - t0), errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="requests per server per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memdb", action="store_true", help="also run jwt with tiled's in-memory principals DB")
    args = p.parse_args(argv)
    modes = MODES + (("jwt-memdb",) if args.memdb else ())

    tmp = Path(tempfile.mkdtemp(prefix="vf-bench-"))
    idp_port = free_port()
    issuer = f"http://127.0.0.1:{idp_port}"
    services = []
    try:
        idp = start_service("idp", [sys.executable, "-m", "visitflow.cli", "idp", "--port", str(idp_port),
                                    "--log-level", "warning"], log_dir=tmp / "logs", health_url=f"{issuer}/health")
        services.append(idp)
        idp.wait_ready(timeout=60)
        servers = {}
        for mode in modes:
            svc, uri = start_tiled(mode, issuer, tmp, mode)
            services.append(svc)
            servers[mode] = uri

        admin = token(issuer, form={"grant_type": "client_credentials", "scope": "visitflow:admin"},
                      auth=("visitflow-admin", "admin-dev-secret"))
        alice = token(issuer, form={"grant_type": "password", "client_id": "visitflow-cli",
                                    "username": "alice", "password": "alice"})
        from visitflow.core.tiled_client import BearerAuth

        # Tokens live 5 minutes; the real client refreshes them, so the benchmark does too.
        alice_auth = BearerAuth(lambda: token(issuer, form={
            "grant_type": "password", "client_id": "visitflow-cli", "username": "alice", "password": "alice"}))
        headers = {m: {"Authorization": f"Apikey {API_KEY}"} if m == "apikey" else {} for m in modes}
        auths = {m: None if m == "apikey" else alice_auth for m in modes}
        urls = {}
        for mode, uri in servers.items():
            setup = {"Authorization": f"Apikey {API_KEY}"} if mode == "apikey" else {"Authorization": f"Bearer {admin}"}
            for path, key in (("", "raw"), ("raw", "a1")):
                httpx.post(f"{uri}/api/v1/metadata/{path}", headers=setup, json={
                    "id": key, "structure_family": "container", "metadata": {}, "specs": [], "data_sources": []},
                ).raise_for_status()
            uid = write_run(uri, None if mode == "apikey" else alice)
            urls[mode] = f"{uri}/api/v1/metadata/raw/a1/{uid}"

        lat = {m: [] for m in servers}
        rps = {m: [] for m in servers}
        failures = {m: [] for m in servers}
        clients = {m: httpx.Client(headers=headers[m], auth=auths[m]) for m in servers}
        for m in servers:  # warm up (JWKS, principal rows, path cache, connection)
            measure(clients[m], urls[m], 50)
        order = list(servers)
        for r in range(args.rounds):
            interleaved(clients, urls, args.n, lat)
            for m in order[r % len(order):] + order[:r % len(order)]:
                rate, errs = throughput(urls[m], headers[m], auths[m], args.n)
                rps[m].append(rate)
                failures[m] += errs
        for c in clients.values():
            c.close()

        extra = {m: ("invalid" if failures[m] else f"{statistics.median(rps[m]):.0f}", str(len(failures[m])))
                 for m in servers}
        rows = latency_rows(lat, "apikey", ("req/s (4 threads, median of rounds)", "failed threads"), extra)
        for m in servers:
            for err in sorted(set(failures[m]))[:3]:
                print(f"{m}: {err}", file=sys.stderr)
        note = (f"Tiled metadata GET of raw/a1/<run>: {args.rounds} rounds x {args.n} sequential keep-alive "
                f"requests per server, interleaved request by request; req/s: {args.n} requests from 4 threads "
                f"per round. "
                f"{time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}.")
        write_result("tiled_auth", "Tiled: JWT + policy vs API key", rows, note)
        return 0
    finally:
        for svc in reversed(services):
            svc.stop()


if __name__ == "__main__":
    sys.exit(main())
