"""Raw data is append-only (issue 20, finding 5), on the session's real Tiled server.

Alice's runs are written by the real bluesky ``TiledWriter`` (tests/fixtures/scans.py), so
its own writes — the run container, stream containers, array appends, table partitions,
descriptor updates and the stop-document metadata update — are the positive control: the
scan completes and the run carries its stop document.  Carol (member of a1, ``write:raw:a1``,
not the writer) is refused with a reason, on an open and on a closed run; after the stop
document Alice is refused too; everybody with raw read scopes still reads.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.scans import run_scan
from tests.fixtures.stream_helpers import scan_in_thread
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.security

APPEND_ONLY = "raw data is append-only"


@pytest.fixture(scope="module")
def closed_run(idp, tiled_server):
    return run_scan(tiled_server.uri, idp.token("alice"), num=3)


def _array_path(uid):
    return f"raw/a1/{uid}/primary/saxs"


def _attempts(uid: str) -> dict:
    """(method, path, kwargs) of writes Carol tried in the red-team pass, and a few more."""
    frame = np.zeros((16, 16), dtype="float64").tobytes()
    return {
        "overwrite_run_metadata": ("PATCH", f"metadata/raw/a1/{uid}", dict(json={
            "content-type": "application/json-patch+json",
            "metadata": [{"op": "add", "path": "/forged", "value": 1}], "specs": None})),
        "replace_run_metadata": ("PUT", f"metadata/raw/a1/{uid}", dict(json={"metadata": {"start": {}}})),
        "overwrite_array_block": ("PUT", f"array/block/{_array_path(uid)}", dict(
            params={"block": "0,0,0"}, content=frame, headers={"Content-Type": "application/octet-stream"})),
        "create_node_in_run": ("POST", f"metadata/raw/a1/{uid}", dict(json={
            "id": "forged", "structure_family": "container", "metadata": {}, "specs": [], "data_sources": []})),
        "delete_array": ("DELETE", f"metadata/{_array_path(uid)}", {}),
    }


CASES = ["overwrite_run_metadata", "replace_run_metadata", "overwrite_array_block", "create_node_in_run",
         "delete_array"]


def _try(tiled_server, token, uid, case):
    method, path, kwargs = _attempts(uid)[case]
    return tiled_server.request(method, path, token, **kwargs)


def test_tiled_writer_writes_a_whole_run_including_its_stop_document(tiled_server, idp, closed_run):
    md = tiled_server.get(f"metadata/raw/a1/{closed_run}", idp.token("alice")).json()["data"]["attributes"]
    assert md["metadata"]["stop"]["exit_status"] == "success", md["metadata"]


@pytest.mark.parametrize("case", CASES)
def test_a_visit_member_cannot_change_someone_elses_closed_run(tiled_server, idp, closed_run, case):
    r = _try(tiled_server, idp.token("carol"), closed_run, case)
    assert r.status_code == 403, (r.status_code, r.text)
    if case != "delete_array":   # deleting raw was already refused by scope (Tiled's own message)
        assert APPEND_ONLY in r.json()["detail"] and "only the writer" in r.json()["detail"], r.text


@pytest.mark.parametrize("case", ["overwrite_run_metadata", "overwrite_array_block", "create_node_in_run"])
def test_the_writer_cannot_change_its_run_after_the_stop_document(tiled_server, idp, closed_run, case):
    r = _try(tiled_server, idp.token("alice"), closed_run, case)
    assert r.status_code == 403, (r.status_code, r.text)
    assert APPEND_ONLY in r.json()["detail"] and "closed" in r.json()["detail"], r.text


def test_visit_members_still_read(tiled_server, idp, closed_run):
    for user in ("alice", "carol"):
        r = tiled_server.get(f"array/full/{_array_path(closed_run)}", idp.token(user),
                             headers={"Accept": "application/octet-stream"})
        assert r.status_code == 200 and len(r.content) == 3 * 16 * 16 * 8, (user, r.status_code)


def test_a_visit_member_cannot_append_to_an_open_run_while_its_writer_can(tiled_server, idp):
    alice, carol = idp.token("alice"), idp.token("carol")
    cap, thread, out = scan_in_thread(tiled_server.uri, alice, num=40, delay=0.15)
    try:
        wait_until(lambda: tiled_server.get(f"metadata/{_array_path(cap.uid)}", alice).status_code == 200,
                   60, "the open run's saxs array")
        refused = {case: _try(tiled_server, carol, cap.uid, case)
                   for case in ("overwrite_run_metadata", "overwrite_array_block", "create_node_in_run")}
        # the writer itself may add to its open run (what TiledWriter does, by hand)
        own = tiled_server.request("POST", f"metadata/raw/a1/{cap.uid}", alice, json={
            "id": "by_the_writer", "structure_family": "container", "metadata": {}, "specs": [],
            "data_sources": []})
    finally:
        thread.join(90)
    assert "uid" in out and "error" not in out, out          # TiledWriter's whole run went through
    for case, r in refused.items():
        assert r.status_code == 403 and "only the writer" in r.json()["detail"], (case, r.status_code, r.text)
    assert own.status_code == 200, own.text
    md = tiled_server.get(f"metadata/raw/a1/{cap.uid}", alice).json()["data"]["attributes"]["metadata"]
    assert "stop" in md and "forged" not in md
