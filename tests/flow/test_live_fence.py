"""The live fence on a real Tiled server (visitflow/tiled/live_fence.py) with the real sink
(visitflow/flow/sink.py): two attempts of one flow run, each its own client, as after a
reschedule.  Once attempt 2 has claimed the live node, attempt 1's every write is refused
(409 with the reason, :class:`Superseded` in the sink) and changes nothing; attempt 2 writes;
a write with no fence, or another flow run's, is refused; a new flow run (a cancelled live
run started again) takes the node over by its claim and the old flow run is refused from then
on; a post writer (no fence) still moves the analysis pointer.  Tiled's ``/metrics`` counts each fenced write by attempt."""

from __future__ import annotations

import re
import uuid

import httpx
import numpy as np
import pytest

from visitflow.core.fence import FENCE_HEADER, Fence
from visitflow.core.tiled_client import BearerAuth, processed_client
from visitflow.errors import Superseded
from visitflow.flow.sink import TiledResultSink, read_result


@pytest.fixture
def run_container(tiled_server, idp):
    run = f"fence-{uuid.uuid4().hex[:8]}"
    auth = BearerAuth(lambda: idp.token("alice"))
    return run, lambda: processed_client(tiled_server.uri, auth, visit="a1", run=run)


def _fence_count(tiled_server, attempt: int, outcome: str) -> float:
    text = httpx.get(f"{tiled_server.uri}/metrics", timeout=10).text
    m = re.search(rf'^visitflow_tiled_live_fence_total{{attempt="{attempt}",outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_superseded_attempt_cannot_write_live(tiled_server, idp, run_container):
    run, container = run_container
    flow_run = str(uuid.uuid4())
    first = TiledResultSink(container(), "demo", "live", {"flow": "demo"}, fence=Fence(flow_run, 1))
    assert first.checkpoint() == 0
    first.write({"avg": np.ones(3)}, frames=4, status="running")
    refused_before = _fence_count(tiled_server, 1, "refused")

    second = TiledResultSink(container(), "demo", "live", {"flow": "demo"}, fence=Fence(flow_run, 2))
    assert second.checkpoint() == 4, "attempt 2 resumes from attempt 1's checkpoint"
    for status in ("running", "complete"):
        with pytest.raises(Superseded, match=r"attempt 1 was superseded by attempt 2"):
            first.write({"avg": np.full(3, 9.0)}, frames=99, status=status)
    with pytest.raises(Superseded):
        first.checkpoint()          # its claim is refused too: it cannot take the node back
    assert _fence_count(tiled_server, 1, "refused") >= refused_before + 3

    second.write({"avg": np.full(3, 2.0), "n": 8}, frames=8, status="complete")
    node = container()["demo"]
    live = node["live"].metadata
    assert live["fence"] == {"flow_run_id": flow_run, "attempt": 2}
    assert live["frames_processed"] == 8 and live["status"] == "complete", dict(live)
    assert node.metadata["current"] == "live"
    np.testing.assert_array_equal(read_result(node)["avg"], [2.0, 2.0, 2.0])


def test_a_new_flow_run_takes_the_live_node_over_by_its_claim(tiled_server, idp, run_container):
    run, container = run_container
    old = TiledResultSink(container(), "demo", "live", {"flow": "demo"}, fence=Fence(str(uuid.uuid4()), 1))
    old.checkpoint()
    old.write({"avg": np.ones(3)}, frames=3, status="running")
    new_run = str(uuid.uuid4())
    new = TiledResultSink(container(), "demo", "live", {"flow": "demo"}, fence=Fence(new_run, 1))
    assert new.checkpoint() == 3, "the new flow run resumes from the old one's checkpoint"
    with pytest.raises(Superseded, match=r"owned by flow run " + new_run):
        old.write({"avg": np.full(3, 9.0)}, frames=99, status="running")
    new.write({"avg": np.full(3, 5.0)}, frames=6, status="complete")
    live = container()["demo"]["live"].metadata
    assert live["fence"] == {"flow_run_id": new_run, "attempt": 1}
    assert live["frames_processed"] == 6 and live["status"] == "complete", dict(live)


def test_writes_without_the_owners_fence_are_refused_with_a_reason(tiled_server, idp, run_container):
    run, container = run_container
    flow_run = str(uuid.uuid4())
    owner = TiledResultSink(container(), "demo", "live", {"flow": "demo"}, fence=Fence(flow_run, 1))
    owner.checkpoint()
    owner.write({"avg": np.ones(3)}, frames=1, status="running")
    path = f"metadata/processed/a1/{run}/demo/live"
    patch = {"content-type": "application/json-patch+json", "specs": None,
             "metadata": [{"op": "add", "path": "/frames_processed", "value": 50}]}
    token = idp.token("alice")
    cases = {"no fence": {}, "another flow run": {FENCE_HEADER: f"{uuid.uuid4()}/7"},
             "malformed": {FENCE_HEADER: "attempt-two"}}
    for case, headers in cases.items():
        r = tiled_server.request("PATCH", path, token, json=patch, headers=headers)
        assert r.status_code == 409, (case, r.status_code, r.text)
        assert r.json()["detail"].startswith("live fence:"), (case, r.text)
    r = tiled_server.request("PATCH", path, token, json=patch, headers={FENCE_HEADER: f"{flow_run}/1"})
    assert r.status_code == 200, r.text          # positive control: the owner's own fence
    # A post run (no fence) still writes its result and moves the analysis pointer.
    post = TiledResultSink(container(), "demo", "post", {"flow": "demo"}, flow_run_id="0123456789abcdef")
    post.write({"avg": np.full(3, 5.0)}, frames=2, status="complete")
    assert container()["demo"].metadata["current"] == "post-01234567"
