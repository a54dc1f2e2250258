"""Two beamlines on one control plane: blueapi for i22 and blueapi for b21 (each its own
``env.metadata.instrument`` and visit) on one Prefect, one token service, one Tiled and ONE
ScopedCredentials Block whose raw template is ``{instrument}/{proposal}/{visit}/{run}``.

The instrument travels start document -> trigger (outbox) -> flow-run tag ``instrument:<name>``
(never a parameter: parameters stay ``{visit, run_id}``) -> ``RunAccess.instrument`` -> the
raw path.  Each analysis reads only its own beamline's run; Bob, on b21 only, sees nothing of
i22 (and Alice nothing of b21).
"""

from __future__ import annotations

import concurrent.futures

import pytest

from visitflow.core import names
from visitflow.core.tiled_client import BearerAuth, connect

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.references import assert_matches, reference_of
from tests.trigger.test_blueapi import outputs_of, run_uid, wait_flow_runs

pytestmark = pytest.mark.blueapi

BEAMLINES = {
    # instrument: (user, proposal, session)
    bs.INSTRUMENT: ("alice", bs.PROPOSAL, bs.SESSION),
    bs.B21_INSTRUMENT: ("bob", bs.B21_PROPOSAL, bs.B21_SESSION),
}


@pytest.fixture(scope="module")
def blueapi_b21(blueapi, tmp_path_factory):
    with blueapi.beamline_blueapi(tmp_path_factory.mktemp("blueapi-b21"), bs.B21_INSTRUMENT) as other:
        yield other


def test_instrument_tag_round_trip_is_pure():
    tags = names.run_tags("peak_stats", "cm1-1", "u1", "live", "b21")
    assert tags[-1] == "instrument:b21" and names.instrument_from_tags(tags) == "b21"
    assert names.instrument_from_tags(names.run_tags("peak_stats", "cm1-1", "u1", "live")) is None
    assert names.instrument_from_tags(["instrument:a", "instrument:b"]) is None   # ambiguous: none


def test_two_beamlines_scan_at_once_each_analysis_reads_its_own_run(blueapi, blueapi_b21, prefect):
    servers = {bs.INSTRUMENT: blueapi.blueapi, bs.B21_INSTRUMENT: blueapi_b21}
    tokens = {inst: blueapi.token(user) for inst, (user, _, _) in BEAMLINES.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {inst: pool.submit(servers[inst].run, tokens[inst], "peak_scan", {"num": 8 + i, "seed": 11 + i},
                                     300, BEAMLINES[inst][2])
                   for i, inst in enumerate(BEAMLINES)}
        uids = {inst: run_uid(f.result()) for inst, f in futures.items()}

    for inst, (user, proposal, session) in BEAMLINES.items():
        uid = uids[inst]
        root = connect(blueapi.tiled.uri, BearerAuth(lambda t=tokens[inst]: t))
        raw = root[f"{inst}/{proposal}/{session}/{uid}"]
        assert raw.metadata["start"]["instrument"] == inst
        runs = wait_flow_runs(prefect, uid, 2)
        assert len(runs) == 2, (inst, runs)
        for r in runs:
            assert r["parameters"] == {"visit": session, "run_id": uid}       # no instrument, no token
            assert f"instrument:{inst}" in r["tags"] and names.instrument_from_tags(r["tags"]) == inst
            done = prefect.wait_for_flow_run(r["id"], timeout=300)
            assert done["state"]["type"] == "COMPLETED", (inst, r["name"], done["state"])
        node = root[f"processed/{session}/{uid}/peak_stats"]
        want = reference_of("peak_stats", raw["primary"])
        for child in (node["live"], next(node[k] for k in node if k.startswith("post-"))):
            assert child.metadata["status"] == "complete"
            assert child.metadata["instrument"] == inst and child.metadata["token_sub"] == user
            assert f"{inst}/{proposal}/{session}/{uid}" in child.metadata["raw_uri"]
            assert_matches(outputs_of(child), want, rtol=1e-9, atol=1e-9, where=f"{inst}/peak_stats/")

    # Bob (b21 only) sees nothing of i22, Alice nothing of b21: raw, processed, or listings.
    for viewer, other in (("bob", bs.INSTRUMENT), ("alice", bs.B21_INSTRUMENT)):
        _, proposal, session = BEAMLINES[other]
        token = tokens[bs.B21_INSTRUMENT if viewer == "bob" else bs.INSTRUMENT]
        uid = uids[other]
        for path in (f"metadata/{other}/{proposal}/{session}/{uid}", f"metadata/processed/{session}/{uid}",
                     f"metadata/processed/{session}/{uid}/peak_stats/live"):
            assert blueapi.tiled.get(path, token).status_code == 404, (viewer, path)
        for path in (f"search/{other}/{proposal}/{session}", f"search/processed/{session}"):
            r = blueapi.tiled.get(path, token)
            assert r.status_code in (401, 403, 404) or r.json()["data"] == [], (viewer, path, r.status_code, r.text[:300])
