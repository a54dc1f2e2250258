"""What does asking OPA cost on a Tiled GET with a facility user's own token?

Starts a real Keycloak 26 as the facility IdP (realm ``facility``, identity only, as in the
``opa`` tests: ``tests/fixtures/keycloak_fixtures.py``; ``VISITFLOW_TEST_KEYCLOAK_URL`` reuses a
running one), a real OPA with ``deployments/opa/``, the token service (production mode) and
three Tiled servers with identical content (raw/a1/<run> written by bluesky's TiledWriter),
then measures side by side, interleaved request by request:

* ``apikey``        tiled's single-user API key, no access policy (the cheapest tiled auth);
* ``user+opa``      Alice's Keycloak access token; the policy asks OPA, decisions cached 5 s;
* ``user+opa-nocache``  the same with the decision cache off: every node check asks OPA;
* ``run-token``     a T_data from the token service on the ``user+opa`` server: scopes
                    decide, OPA is not asked (what a flow run pays).

    python benchmarks/tiled_authority.py [--n 300] [--rounds 3]

Writes the table to ``benchmarks/results/tiled_authority.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.latency_table import interleaved, latency_rows, measure, write_result  # noqa: E402
from benchmarks.tiled_auth import API_KEY, start_tiled, write_run  # noqa: E402
from tests.fixtures.federation_fixtures import start_token_service  # noqa: E402
from tests.fixtures.keycloak_fixtures import FACILITY_REALM, KeycloakHandle, start_keycloak, wait_for_realm  # noqa: E402
from tests.fixtures.opa_fixtures import start_opa  # noqa: E402
from visitflow.core.scopes import data_token_scopes, grant_scopes  # noqa: E402
from visitflow.core.tiled_client import BearerAuth  # noqa: E402


def keycloak(tmp: Path, stop: list) -> KeycloakHandle:
    url = os.environ.get("VISITFLOW_TEST_KEYCLOAK_URL")
    if url:
        return KeycloakHandle(url.rstrip("/"))
    kc = start_keycloak(tmp / "keycloak")
    stop.append(kc.service)
    return kc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vf-bench-authority-"))
    stop = []
    try:
        facility = keycloak(tmp, stop).realm_handle(FACILITY_REALM)
        wait_for_realm(facility.issuer)
        opa = start_opa(tmp / "opa")
        stop.append(opa.service)
        ts = start_token_service(tmp / "ts", facility.issuer, opa.direct_url)
        stop.append(ts.service)
        servers = {}
        for name, mode, cache in (("apikey", "apikey", None), ("user+opa", "jwt", 5), ("user+opa-nocache", "jwt", 0)):
            kw = {} if cache is None else {"user_issuer": facility.issuer,
                                           "authority": {"kind": "opa", "url": opa.direct_url, "cache_seconds": cache}}
            svc, uri = start_tiled(name, ts.issuer, tmp, mode, **kw)
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
        # Keycloak's tokens live 5 minutes: refresh them as real clients do (BearerAuth, before expiry).
        user_auth = BearerAuth(lambda: facility.token("alice"))
        data_auth = BearerAuth(lambda: ts.exchange(grant, "visitflow", audience="tiled",
                                                   scope=str(data_token_scopes("a1", run, analysis="saxs_average")))["access_token"])
        variants = {
            "apikey": (servers["apikey"], {"Authorization": f"Apikey {API_KEY}"}, None, uids["apikey"]),
            "user+opa": (servers["user+opa"], {}, user_auth, run),
            "user+opa-nocache": (servers["user+opa-nocache"], {}, user_auth, uids["user+opa-nocache"]),
            "run-token": (servers["user+opa"], {}, data_auth, run),
        }
        clients = {m: httpx.Client(headers=h, auth=a) for m, (_u, h, a, _r) in variants.items()}
        urls = {m: f"{u}/api/v1/metadata/raw/a1/{r}" for m, (u, _h, _a, r) in variants.items()}
        for m in variants:
            measure(clients[m], urls[m], 30)  # warm up (JWKS, principal rows, decision cache)
        lat = {m: [] for m in variants}
        for _r in range(args.rounds):
            interleaved(clients, urls, args.n, lat)
        for c in clients.values():
            c.close()
        note = (f"Tiled metadata GET of raw/a1/<run>: {args.rounds} rounds x {args.n} sequential keep-alive "
                f"requests per variant, interleaved request by request; facility IdP: Keycloak 26.7.3 "
                f"(realm {FACILITY_REALM}, identity only), OPA v1.22.3, all on loopback. "
                f"{time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}.")
        write_result("tiled_authority", "Tiled: Keycloak user token + OPA vs API key", latency_rows(lat, "apikey"), note)
        return 0
    finally:
        for svc in reversed(stop):
            svc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
