"""Keycloak vs the dev IdP, side by side in one run: start time, memory, token-exchange latency.

    python benchmarks/keycloak_latency.py [--n 100] [--write]

Starts a Keycloak 26 with our realm (tests/fixtures/keycloak_fixtures.py: deployments/keycloak/fetch.sh
+ start.sh, fresh data directory) and a dev IdP in its Keycloak-emulating mode
(``fixed_scopes: true``), then times, sequentially on loopback, for each: the password login,
hop 1 (blueapi: user token -> T_grant, visit scopes, with refresh) and hop 2 (visitflow:
T_grant -> T_data with refresh).  Keycloak is warmed up first (JIT) with the same number of
rounds, which are not counted.  ``VISITFLOW_TEST_KEYCLOAK_URL`` reuses a running Keycloak
(then start time and RSS are not measured).  ``--write`` replaces the section of
benchmarks/RESULTS.md headed "Keycloak vs dev IdP".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.idp_fixtures import start_fixed_scopes_idp  # noqa: E402
from tests.fixtures.keycloak_fixtures import KeycloakHandle, start_keycloak  # noqa: E402

GRANT = "run:saxs_average:a1 read:data:a1 write:data:a1"
DATA = "read:data:a1 write:data:a1"
HEADING = "## Keycloak vs dev IdP (token exchange)"


def rounds(idp, n: int) -> dict[str, list[float]]:
    times = {"login": [], "hop 1 exchange (blueapi)": [], "hop 2 exchange (visitflow)": []}
    for _ in range(n):
        t = time.perf_counter()
        user = idp.token("alice")
        times["login"].append(time.perf_counter() - t)
        t = time.perf_counter()
        grant = idp.exchange(user, "blueapi", audience="visitflow", scope=GRANT, refresh=True)["access_token"]
        times["hop 1 exchange (blueapi)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        idp.exchange(grant, "visitflow", audience="tiled", scope=DATA, refresh=True)
        times["hop 2 exchange (visitflow)"].append(time.perf_counter() - t)
    return times


def rss_kib(pid: int) -> int:
    import subprocess

    out = subprocess.run(["ps", "-o", "rss=", "-g", str(pid)], capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split())


def p50_ms(v: list[float]) -> float:
    return statistics.median(v) * 1000


def p95_ms(v: list[float]) -> float:
    return sorted(v)[int(0.95 * (len(v) - 1))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        url = os.environ.get("VISITFLOW_TEST_KEYCLOAK_URL")
        kc = KeycloakHandle(url.rstrip("/")) if url else start_keycloak(tmp / "kc")
        t0 = time.monotonic()
        (tmp / "dev").mkdir()
        dev = start_fixed_scopes_idp(tmp / "dev")
        dev_start = time.monotonic() - t0
        try:
            rounds(kc, args.n)  # warm-up: the JIT, Keycloak's caches
            rounds(dev, min(args.n, 20))
            kc_t, dev_t = rounds(kc, args.n), rounds(dev, args.n)
            kc_rss = rss_kib(kc.service.pid) if kc.service else None
            dev_rss = rss_kib(dev.service.pid)
        finally:
            dev.service.stop()
            if kc.service:
                kc.service.stop(timeout=30)
    rows = [("start (process → ready)", f"{kc.started_in:.1f} s" if kc.started_in else "reused",
             f"{dev_start:.1f} s", f"{kc.started_in / dev_start:.0f}×" if kc.started_in else "")]
    if kc_rss:
        rows.append(("RSS after the runs", f"{kc_rss / 1024:.0f} MiB", f"{dev_rss / 1024:.0f} MiB",
                     f"{kc_rss / dev_rss:.1f}×"))
    for k in kc_t:
        rows.append((f"{k} p50 / p95", f"{p50_ms(kc_t[k]):.1f} / {p95_ms(kc_t[k]):.1f} ms",
                     f"{p50_ms(dev_t[k]):.1f} / {p95_ms(dev_t[k]):.1f} ms",
                     f"{p50_ms(kc_t[k]) / p50_ms(dev_t[k]):.2f}×"))
    stamp = (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.node()} · {os.cpu_count()} cores · "
             f"n={args.n} sequential rounds each (after {args.n} warm-up rounds) · Keycloak 26.7.3 dev mode, "
             f"heap {os.environ.get('JAVA_OPTS_KC_HEAP', '-Xms64m -Xmx384m')}; dev IdP with fixed_scopes")
    table = "\n".join(["| measure | Keycloak | dev IdP | Keycloak/dev |", "|---|---|---|---|"]
                      + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows])
    section = (f"{HEADING}\n\n{stamp}\n\nReproduce: `python benchmarks/keycloak_latency.py --n {args.n} --write`"
               f" (the machine was shared with other test runs; ratios are from the same run).\n\n{table}\n")
    print(section)
    if args.write:
        path = REPO / "benchmarks" / "RESULTS.md"
        text = path.read_text()
        if HEADING in text:
            head, _, rest = text.partition(HEADING)
            nxt = rest.find("\n## ")
            text = head + section + (rest[nxt:] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        path.write_text(text)


if __name__ == "__main__":
    main()
