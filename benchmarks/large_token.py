"""What a huge token costs a Tiled GET, before and after issue 20's limits, side by side.

The red team's token: the public login client issued 481 KiB (20,000 scopes the user holds)
and each metadata GET with it cost about 5x a normal one.  Now the token service refuses to
issue it (``Limits``) and Tiled refuses any request whose headers exceed 16 KiB before
authentication (visitflow/core/asgi_limits.py).  To show both sides on one machine at one
load this starts:

* a dev IdP whose limits are raised far enough to mint that token again (*emulating* the
  token service before the limits), with a user ``hoarder`` holding ``read:data:a1`` and
  19,999 other visit scopes;
* two Tiled servers as ``visitflow tiled serve`` builds them: ``before`` with the header cap
  raised out of the way (``VISITFLOW_MAX_HEADER_BYTES``; emulates the server before), and
  ``after`` as shipped;

and times sequential keep-alive GETs of ``/api/v1/metadata/raw/a1`` with Alice's normal token
and with the huge one on each, request by request in rotating order.  Ratios are each
server's huge-token median over its own normal-token median.

    python benchmarks/large_token.py [--n 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency_table import write_result  # noqa: E402
from benchmarks.tiled_auth import start_tiled, token  # noqa: E402
from visitflow.core.tiled_admin import admin_auth, ensure_visits  # noqa: E402
from visitflow.stack.services import free_port, start_service  # noqa: E402
from visitflow.tiled.server import MAX_HEADER_ENV  # noqa: E402

SCOPES = 20_000


def timed(client: httpx.Client, url: str, status: int) -> float:
    t0 = time.perf_counter()
    r = client.get(url)
    dt = time.perf_counter() - t0
    assert r.status_code == status, (status, r.status_code, r.text[:300])
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=150, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vf-bench-bigtoken-"))
    config = yaml.safe_load((REPO / "deployments" / "idp.yaml").read_text())
    config["users"]["hoarder"] = {"password": "hoarder",
                                  "scopes": ["read:data:a1"] + [f"read:data:v{i:05d}" for i in range(1, SCOPES)]}
    config["limits"] = {"max_scopes": 10 * SCOPES, "max_token_bytes": 1 << 24, "max_header_bytes": 1 << 24}
    config["lifetimes"]["access"] = 3600
    (tmp / "idp.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    services = []
    try:
        idp = start_service("idp", [sys.executable, "-m", "visitflow.cli", "idp", "--config", str(tmp / "idp.yaml"),
                                    "--port", str(port), "--log-level", "warning"], log_dir=tmp / "logs",
                            health_url=f"{issuer}/health")
        services.append(idp)
        idp.wait_ready(timeout=60)
        servers = {}
        for name, cap in (("before", str(1 << 26)), ("after", None)):
            old = os.environ.pop(MAX_HEADER_ENV, None)
            if cap:
                os.environ[MAX_HEADER_ENV] = cap
            try:
                svc, uri = start_tiled(name, issuer, tmp, "jwt")
            finally:
                os.environ.pop(MAX_HEADER_ENV, None)
                if old is not None:
                    os.environ[MAX_HEADER_ENV] = old
            services.append(svc)
            servers[name] = uri
            ensure_visits(uri, admin_auth(issuer, "visitflow-admin", "admin-dev-secret"), ["a1"])
        login = {"grant_type": "password", "client_id": "visitflow-cli"}
        normal = token(issuer, form={**login, "username": "alice", "password": "alice"})
        huge = token(issuer, form={**login, "username": "hoarder", "password": "hoarder"})
        print(f"huge token: {len(huge) / 1024:.0f} KiB, {SCOPES} scopes; normal: {len(normal)} bytes", flush=True)
        variants = {  # name -> (server, token, expected status)
            "before normal": ("before", normal, 200), "before huge": ("before", huge, 200),
            "after normal": ("after", normal, 200), "after huge": ("after", huge, 431)}
        clients = {v: httpx.Client(headers={"authorization": f"Bearer {tok}"}, timeout=60)
                   for v, (_, tok, _) in variants.items()}
        urls = {v: f"{servers[s]}/api/v1/metadata/raw/a1" for v, (s, _, _) in variants.items()}
        for v, (_, _, status) in variants.items():   # warm-up (caches, connections)
            for _ in range(5):
                timed(clients[v], urls[v], status)
        lat = {v: [] for v in variants}
        order = list(variants)
        for _ in range(args.rounds):
            for i in range(args.n):
                for v in order[i % len(order):] + order[:i % len(order)]:
                    lat[v].append(timed(clients[v], urls[v], variants[v][2]))
        load = os.getloadavg()
        rows = ["| variant | answer | median ms | p90 ms | huge / normal (median) |", "|---|---|---|---|---|"]
        for v, xs in lat.items():
            xs = sorted(xs)
            server = variants[v][0]
            ratio = statistics.median(xs) / statistics.median(lat[f"{server} normal"])
            rows.append(f"| {v} | {variants[v][2]} | {statistics.median(xs) * 1e3:.2f} | "
                        f"{xs[int(0.9 * len(xs))] * 1e3:.2f} | {ratio:.2f} |")
        note = (f"{args.rounds} rounds x {args.n} sequential keep-alive GETs per variant, interleaved; huge token "
                f"{len(huge) / 1024:.0f} KiB ({SCOPES} scopes), normal {len(normal)} bytes; load average "
                f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.  'before' emulates the servers before issue 20's "
                "limits (header cap raised; the token service's limits raised to mint the token at all).")
        write_result("large_token", "A huge token's cost on a Tiled GET, before and after the limits", rows, note)
        for c in clients.values():
            c.close()
    finally:
        for svc in services:
            svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
