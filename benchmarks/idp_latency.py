"""Dev IdP latency: password login vs RFC 8693 exchange (both hops), sequential, on loopback.

    python benchmarks/idp_latency.py [--n 200]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visitflow.stack.services import free_port, start_service  # noqa: E402

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
AT = "urn:ietf:params:oauth:token-type:access_token"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    n = p.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        t0 = time.monotonic()
        svc = start_service("idp", [sys.executable, "-m", "visitflow.cli", "idp", "--port", str(port),
                                    "--log-level", "warning"], log_dir=Path(tmp),
                            health_url=f"http://127.0.0.1:{port}/health")
        svc.wait_ready(60, interval=0.05)
        startup = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}/token"
        times = {"login": [], "exchange user->grant": [], "exchange grant->data": []}
        try:
            with httpx.Client() as c:
                for _ in range(n):
                    t = time.perf_counter()
                    user = c.post(url, data={"grant_type": "password", "client_id": "visitflow-cli",
                                             "username": "alice", "password": "alice"}).json()["access_token"]
                    times["login"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    grant = c.post(url, auth=("blueapi", "blueapi-dev-secret"), data={
                        "grant_type": EXCHANGE, "subject_token": user, "subject_token_type": AT,
                        "audience": "visitflow", "scope": "run:saxs_average:a1 read:raw:a1/r write:processed:a1/r"}
                                   ).json()["access_token"]
                    times["exchange user->grant"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    r = c.post(url, auth=("visitflow", "visitflow-dev-secret"), data={
                        "grant_type": EXCHANGE, "subject_token": grant, "subject_token_type": AT,
                        "audience": "tiled", "scope": "read:raw:a1/r write:processed:a1/r"})
                    assert r.status_code == 200, r.text
                    times["exchange grant->data"].append(time.perf_counter() - t)
        finally:
            svc.stop()
    print(f"| IdP start (process → /health) | {startup:.2f} s |")
    for k, v in times.items():
        v = sorted(v)
        print(f"| {k} | median {statistics.median(v) * 1000:.1f} ms, p95 {v[int(0.95 * len(v))] * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
