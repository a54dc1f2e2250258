"""``visitflow grants-sweep`` as an operator runs it (cron, or a scheduled deployment): the
console script in a subprocess against the session's real Prefect server and dev IdP.

Why: :func:`visitflow.production.grant_hygiene.sweep` is tested inside the facility story, but
the command a facility schedules -- its flags, its environment variable for the client
secret, what it prints -- was never run.  Here a real post run ends, and the command must
delete (and revoke) that run's grant, delete an expired one, keep the grant of a run whose
post run is still to come, and say so.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.fixtures.console import run_visitflow
from tests.fixtures.idp_fixtures import SECRETS
from tests.fixtures.scans import run_scan
from visitflow.core import names as grants

pytestmark = pytest.mark.e2e

GRANT = "run:{a}:{v} read:raw:{v}/{r} write:processed:{v}/{r}"


def test_grants_sweep_deletes_grants_of_ended_runs_and_says_so(idp, tiled_server, prefect_stack):
    api = prefect_stack.api
    alice = idp.token("alice")

    def real_grant(run: str) -> str:
        return idp.exchange(alice, "blueapi", audience="visitflow",
                            scope=GRANT.format(a="saxs_average", v="a1", r=run))["access_token"]

    # a run whose post analysis ran to the end
    ended = run_scan(tiled_server.uri, alice, num=3)
    ended_grant = real_grant(ended)
    ended_name = prefect_stack.store_grant("saxs_average", "a1", ended, ended_grant)
    run = prefect_stack.run("saxs_average", "post", "a1", ended)
    assert run["state"]["type"] == "COMPLETED", (run["state"], prefect_stack.logs(run["id"]))
    # a run whose analyses are still to come (no flow run yet), and a grant past its exp
    coming = f"coming-{uuid.uuid4().hex[:8]}"
    coming_name = prefect_stack.store_grant("saxs_average", "a1", coming, real_grant(coming))
    stale = f"stale-{uuid.uuid4().hex[:8]}"
    now = int(time.time())
    expired = idp.sign(idp.claims(aud="visitflow", azp="blueapi", exp=now - 60, iat=now - 3600, nbf=now - 3600,
                                  scope=GRANT.format(a="saxs_average", v="a1", r=stale), act={"sub": "blueapi"}))
    stale_name = prefect_stack.store_grant("saxs_average", "a1", stale, expired)

    proc = run_visitflow("grants-sweep", "--prefect-api-url", prefect_stack.api_url, "--issuer", idp.issuer,
                         env={"VISITFLOW_CLIENT_SECRET": SECRETS["visitflow"]}, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert f"deleted {ended_name}: its runs have ended\n" in out, out
    assert f"deleted {stale_name}: expired\n" in out, out
    assert coming_name not in out, out
    # the closing count covers every grant on the server (other tests' too): at least ours
    (summary,) = [line for line in out.splitlines() if line.endswith("kept (runs still to come or running)")]
    deleted, kept = (int(part.split()[0]) for part in summary.split(", "))
    assert deleted == len([line for line in out.splitlines() if line.startswith("deleted ")]) >= 2, out
    assert kept >= 1, out

    # what it said is what it did
    names = {d["name"] for d in api.request("POST", "/block_documents/filter", json={
        "block_types": {"slug": {"any_": ["secret"]}}, "limit": 200})}
    assert ended_name not in names and stale_name not in names
    assert coming_name in names
    assert coming_name == grants.grant_secret_name("saxs_average", "a1", coming)
    # and the ended run's grant was revoked at the IdP: a copy taken before is dead too
    r = idp.exchange_response(ended_grant, "visitflow", audience="tiled",
                              scope=f"read:raw:a1/{ended} write:processed:a1/{ended}")
    assert r.status_code in (400, 401) and "revoked" in r.text, r.text

    # a second sweep finds nothing more of ours to delete
    again = run_visitflow("grants-sweep", "--prefect-api-url", prefect_stack.api_url, timeout=300)
    assert again.returncode == 0 and ended_name not in again.stdout and stale_name not in again.stdout, again.stdout
    api.delete_secret(coming_name)
