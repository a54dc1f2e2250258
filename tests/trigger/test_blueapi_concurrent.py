"""Four scans at once across two beamlines through blueapi, on Tiled on PostgreSQL (issue 19
item 5): the facility's storage under the facility's load shape.

Four ``blueapi serve`` (blueapi runs one plan at a time, so one server per concurrent scan):
the session stack's i22 and one more i22 (alice, visit cm12345-1), two b21 (bob, cm67890-1),
all on one IdP, one Prefect and the session stack's Tiled — whose catalog, TiledWriter tables
and principals are PostgreSQL databases (tests/fixtures/blueapi_fixtures.py).  Every scan is
written by blueapi's own TiledWriter while the other three are; each starts its live and post
analyses through the trigger.

Shown: no 500 (Tiled's log, every blueapi task's outcome), no duplicate rows (queried in the
catalog and tabular databases themselves), each run's events once each, and every analysis
result (8: live and post of 4 runs) equal to an independent numpy computation on its own raw run.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from visitflow.core.tiled_client import BearerAuth, connect

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.ci import missing_part
from tests.fixtures.postgres_fixtures import fetch
from tests.fixtures.references import assert_matches, reference_of
from tests.trigger.test_blueapi import outputs_of, run_uid, wait_flow_runs

pytestmark = pytest.mark.blueapi

#: (instrument, user, proposal, session) of each concurrent scan
SCANS = [(bs.INSTRUMENT, "alice", bs.PROPOSAL, bs.SESSION), (bs.INSTRUMENT, "alice", bs.PROPOSAL, bs.SESSION),
         (bs.B21_INSTRUMENT, "bob", bs.B21_PROPOSAL, bs.B21_SESSION),
         (bs.B21_INSTRUMENT, "bob", bs.B21_PROPOSAL, bs.B21_SESSION)]
NUM, DELAY = 14, 0.3


@pytest.fixture(scope="module")
def servers(blueapi, tmp_path_factory):
    """The session's i22 blueapi and three more (i22, b21, b21), started side by side."""
    def start(instrument):
        return bs.start_blueapi(tmp_path_factory.mktemp(f"blueapi-{instrument}"), issuer=blueapi.idp.issuer,
                                tiled_uri=blueapi.tiled.uri,
                                prefect_api_url=f"http://127.0.0.1:{blueapi.proxy.port}/api",
                                token=lambda: blueapi.idp.token("alice"), instrument=instrument)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(start, inst) for inst, *_ in SCANS[1:]]
        others = [f.result() for f in futures]
    try:
        yield [blueapi.blueapi] + others
    finally:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:   # side by side: each stop may wait
            list(pool.map(lambda other: bs._stop_quietly(other.service), others))


def test_four_scans_two_beamlines_on_postgres_no_500_no_duplicates_results_equal_numpy(blueapi, servers, prefect):
    dbs = blueapi.tiled_databases
    if not dbs:
        missing_part("the blueapi stack's Tiled is on SQLite: set VISITFLOW_TEST_POSTGRES_URL "
                     "(tests/fixtures/postgres_fixtures.py) for Tiled on PostgreSQL")
    tokens = {user: blueapi.token(user) for user in ("alice", "bob")}
    with concurrent.futures.ThreadPoolExecutor(len(SCANS)) as pool:
        futures = [pool.submit(server.run, tokens[user], "peak_scan", {"num": NUM + i, "seed": 31 + i, "delay": DELAY},
                               300, session)
                   for i, (server, (_, user, _, session)) in enumerate(zip(servers, SCANS))]
        uids = [run_uid(f.result()) for f in futures]   # every task succeeded: no TiledWriter error
    assert len(set(uids)) == len(SCANS)

    for i, (uid, (inst, user, proposal, session)) in enumerate(zip(uids, SCANS)):
        runs = wait_flow_runs(prefect, uid, 2)
        assert len(runs) == 2, (inst, uid, runs)
        for r in runs:
            done = prefect.wait_for_flow_run(r["id"], timeout=420)
            assert done["state"]["type"] == "COMPLETED", (inst, r["name"], done["state"])
        root = connect(blueapi.tiled.uri, BearerAuth(lambda t=tokens[user]: t))
        raw = root[f"{inst}/{proposal}/{session}/{uid}"]
        seq = sorted(int(v) for v in raw["primary"]["seq_num"].read())
        assert seq == list(range(1, NUM + i + 1)), (inst, uid, "each event once, none lost")
        want = reference_of("peak_stats", raw["primary"])
        node = root[f"processed/{session}/{uid}/peak_stats"]
        for child in (node["live"], next(node[k] for k in node if k.startswith("post-"))):
            assert child.metadata["status"] == "complete" and child.metadata["frames_processed"] == NUM + i
            assert_matches(outputs_of(child), want, rtol=1e-9, atol=1e-9, where=f"{inst}/{uid[:8]}/{child.item['id']}/")

    log = blueapi.tiled.service.log_path.read_text(errors="replace")
    for bad in ('" 500', "Exception in ASGI application", "Traceback", "database is locked"):
        assert bad not in log, (bad, log[-3000:])
    for server in servers:
        assert "500 Internal Server Error" not in server.log(), server.log()[-3000:]

    dup = fetch(dbs["catalog"], "select parent, key, count(*) from nodes group by parent, key having count(*) > 1")
    assert dup == [], dup
    in_catalog = {r["key"] for r in fetch(dbs["catalog"], "select key from nodes where key = any($1::text[])", uids)}
    assert in_catalog == set(uids), "the runs are in PostgreSQL's catalog"
    tables = [r["tablename"] for r in fetch(dbs["tables"], "select tablename from pg_tables "
                                                            "where schemaname='public' and tablename like 'table_%'")]
    assert tables, "the events are in PostgreSQL's tabular storage"
    for name in tables:
        dups = fetch(dbs["tables"], f'select _dataset_id, seq_num, count(*) from "{name}" '
                                    "group by _dataset_id, seq_num having count(*) > 1")
        assert dups == [], (name, dups)
