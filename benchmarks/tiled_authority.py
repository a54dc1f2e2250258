"""What does asking OPA cost on a Tiled GET with a facility user's own token?

Starts the facility IdP (**emulated**: an identity-only dev IdP, as in the ``opa`` tests),
a real OPA with ``deployments/opa/``, the token service (production mode) and three Tiled
servers with identical content (raw/a1/<run> written by bluesky's TiledWriter), then
measures side by side, interleaved request by request:

* ``apikey``        tiled's single-user API key, no access policy (the cheapest tiled auth);
* ``user+opa``      Alice's facility-IdP token; the policy asks OPA, decisions cached 5 s;
* ``user+opa-nocache``  the same with the decision cache off: every node check asks OPA;
* ``run-token``     a T_data from the token service on the ``user+opa`` server: scopes
                    decide, OPA is not asked (what a flow run pays).

    python benchmarks/tiled_authority.py [--n 300] [--rounds 3]

Writes the table to ``benchmarks/results/tiled_authority.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tiled_auth import API_KEY, SERVE, measure, write_run  # noqa: E402
from tests.federation_fixtures import FACILITY_IDP, start_token_service  # noqa: E402
from tests.idp_fixtures import start_idp  # noqa: E402
from tests.opa_fixtures import start_opa  # noqa: E402
from visitflow.scopes import data_token_scopes, grant_scopes  # noqa: E402
from visitflow.services import free_port, start_service  # noqa: E402
from visitflow.tiled.client import BearerAuth  # noqa: E402
from visitflow.tiled.config import prepare_state_dir, render_config, write_config  # noqa: E402


def start_tiled(name: str, tmp: Path, *, issuer: str, user_issuer: str | None = None,
                authority: dict | None = None, apikey: bool = False):
    port = free_port()
    state = prepare_state_dir(tmp / name)
    cfg = render_config(issuer=issuer, state_dir=state, port=port, user_issuer=user_issuer, authority=authority)
    if apikey:
        cfg.pop("access_control")
        cfg.pop("database")
        cfg["authentication"] = {"single_user_api_key": API_KEY, "allow_anonymous_access": False}
    path = write_config(cfg, state / "tiled.yml")
    svc = start_service(name, [sys.executable, "-c", SERVE, str(path)], log_dir=tmp / "logs",
                        health_url=f"http://127.0.0.1:{port}/api/v1/")
    svc.wait_ready(timeout=120)
    return svc, f"http://127.0.0.1:{port}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vf-bench-authority-"))
    stop = []
    try:
        (tmp / "facility.yaml").write_text(yaml.safe_dump(FACILITY_IDP))
        facility = start_idp(tmp / "facility", tmp / "facility.yaml")
        stop.append(facility.service)
        opa = start_opa(tmp / "opa")
        stop.append(opa.service)
        ts = start_token_service(tmp / "ts", facility.issuer, opa.direct_url)
        stop.append(ts.service)
        servers = {}
        for name, kw in (("apikey", {"apikey": True}),
                         ("user+opa", {"authority": {"kind": "opa", "url": opa.direct_url, "cache_seconds": 5}}),
                         ("user+opa-nocache", {"authority": {"kind": "opa", "url": opa.direct_url, "cache_seconds": 0}})):
            svc, uri = start_tiled(name, tmp, issuer=ts.issuer, user_issuer=facility.issuer, **kw)
            stop.append(svc)
            servers[name] = uri
        admin = ts.client_token("visitflow-admin", scope="visitflow:admin")
        alice = facility.token("alice")
        uids = {}
        for name, uri in servers.items():
            setup = {"Authorization": f"Apikey {API_KEY}" if name == "apikey" else f"Bearer {admin}"}
            for path, key in (("", "raw"), ("raw", "a1")):
                httpx.post(f"{uri}/api/v1/metadata/{path}", headers=setup, json={
                    "id": key, "structure_family": "container", "metadata": {}, "specs": [], "data_sources": []},
                ).raise_for_status()
            uids[name] = write_run(uri, None if name == "apikey" else alice)
        run = uids["user+opa"]
        grant = ts.exchange(alice, "blueapi", audience="visitflow",
                            scope=str(grant_scopes("saxs_average", "a1", run)))["access_token"]
        # Tokens live 5 minutes: refresh them as real clients do (BearerAuth, before expiry).
        user_auth = BearerAuth(lambda: facility.token("alice"))
        data_auth = BearerAuth(lambda: ts.exchange(grant, "visitflow", audience="tiled",
                                                   scope=str(data_token_scopes("a1", run)))["access_token"])
        variants = {
            "apikey": (servers["apikey"], {"Authorization": f"Apikey {API_KEY}"}, None, uids["apikey"]),
            "user+opa": (servers["user+opa"], {}, user_auth, run),
            "user+opa-nocache": (servers["user+opa-nocache"], {}, user_auth, uids["user+opa-nocache"]),
            "run-token": (servers["user+opa"], {}, data_auth, run),
        }
        clients = {m: httpx.Client(headers=h, auth=a) for m, (_u, h, a, _r) in variants.items()}
        urls = {m: f"{u}/api/v1/metadata/raw/a1/{r}" for m, (u, _h, _a, r) in variants.items()}
        for m in variants:
            measure(clients[m], urls[m], 30)  # warm up
        lat = {m: [] for m in variants}
        order = list(variants)
        for _r in range(args.rounds):
            for i in range(args.n):
                for m in order[i % len(order):] + order[:i % len(order)]:
                    lat[m] += measure(clients[m], urls[m], 1)
        for c in clients.values():
            c.close()
        base = statistics.median(lat["apikey"])
        rows = ["| auth | median ms | p90 ms | ratio vs apikey (median) |", "|---|---|---|---|"]
        for m in variants:
            xs = sorted(lat[m])
            med, p90 = statistics.median(xs), xs[int(0.9 * len(xs))]
            rows.append(f"| {m} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | {med / base:.2f} |")
        table = "\n".join(rows)
        note = (f"\nTiled metadata GET of raw/a1/<run>: {args.rounds} rounds x {args.n} sequential keep-alive "
                f"requests per variant, interleaved request by request; facility IdP emulated (identity-only "
                f"dev IdP), OPA v1.22.3 on loopback. {time.strftime('%Y-%m-%d %H:%M')}, "
                f"python {sys.version.split()[0]}.\n")
        print(table + "\n" + note)
        out = REPO / "benchmarks" / "results" / "tiled_authority.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Tiled: facility user token + OPA vs API key\n\n" + table + "\n" + note)
        return 0
    finally:
        for svc in reversed(stop):
            svc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
