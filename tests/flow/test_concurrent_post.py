"""Concurrent post runs of one analysis and run, against a real Tiled server (and, end to
end, real Prefect flow runs): each finishes, ``current`` ends on the newest complete result,
and nobody deletes a result another run is still writing or has made current."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import numpy as np
import pytest

from visitflow.core.tiled_client import BearerAuth, processed_client
from visitflow.flow.sink import TiledResultSink, read_result

from tests.fixtures.references import assert_matches, reference_of

from tests.fixtures.scans import run_scan, user_root

pytestmark = pytest.mark.analysts

WRITERS = 3
ROUNDS = 5


@pytest.fixture
def run_container(tiled_server, idp):
    run = f"conc-{uuid.uuid4().hex[:8]}"
    auth = BearerAuth(lambda: idp.token("alice"))
    return lambda: processed_client(tiled_server.uri, auth, visit="a1", run=run)


def post_writer(run_container, flow_run_id: str, value: float, barrier: threading.Barrier, errors: list):
    try:
        sink = TiledResultSink(run_container(), "demo", "post", {"flow": "demo"}, flow_run_id=flow_run_id)
        barrier.wait(timeout=60)
        # Several arrays, so the writes of concurrent runs interleave with each other's
        # pointer moves and deletes.
        outputs = {f"a{i}": np.full((40, 40), value + i) for i in range(3)} | {"value": value}
        sink.write(outputs, frames=10, status="complete")
    except Exception as exc:  # noqa: BLE001 - collected and asserted on below
        errors.append(f"{flow_run_id}: {type(exc).__name__}: {exc}")


def test_concurrent_post_runs_end_with_one_complete_current(run_container):
    written: dict[str, float] = {}
    for rnd in range(ROUNDS):
        barrier, errors, threads = threading.Barrier(WRITERS), [], []
        for w in range(WRITERS):
            fid = f"{rnd:02d}{w:02d}{uuid.uuid4().hex[:12]}"
            written[f"post-{fid[:8]}"] = float(10 * rnd + w)
            threads.append(threading.Thread(target=post_writer, args=(run_container, fid, 10 * rnd + w, barrier,
                                                                       errors)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), f"round {rnd}: a writer is still running"
        assert not errors, errors  # nobody's half-written result was deleted under it
        node = run_container()["demo"]
        current = node.metadata["current"]
        children = {k: c.metadata for k, c in node.items()}
        assert current in children, f"round {rnd}: current {current} was deleted ({sorted(children)})"
        assert children[current]["status"] == "complete"
        # The documented rule (visitflow/flow/sink.py): newest ``completed`` time, ties by key.
        complete = {k: dt.datetime.fromisoformat(m["completed"]) for k, m in children.items()
                    if m.get("status") == "complete"}
        assert complete, f"round {rnd}: no complete result ({children})"
        newest = max(complete, key=lambda k: (complete[k], k))
        assert current == newest, (current, newest)
        result = read_result(node)
        v = written[current]
        assert result["value"] == v
        for i in range(3):
            np.testing.assert_array_equal(result[f"a{i}"], np.full((40, 40), v + i))
        assert node.metadata["status"] == "complete" and node.metadata["scalars"]["value"] == v


def test_a_running_post_is_not_deleted_by_one_that_finishes(run_container):
    slow = TiledResultSink(run_container(), "demo", "post", {"flow": "demo"}, flow_run_id="slow0000aaaa")
    slow._variant_node()  # started: its child exists, status running
    fast = TiledResultSink(run_container(), "demo", "post", {"flow": "demo"}, flow_run_id="fast0000bbbb")
    fast.write({"x": np.ones(3)}, frames=3, status="complete")
    node = run_container()["demo"]
    assert {"post-slow0000", "post-fast0000"} <= set(node)
    assert node.metadata["current"] == "post-fast0000"
    slow.write({"x": np.full(3, 2.0)}, frames=3, status="complete")   # finishes later: newest wins
    node = run_container()["demo"]
    assert node.metadata["current"] == "post-slow0000" and set(node) == {"post-slow0000"}
    np.testing.assert_array_equal(read_result(node)["x"], [2.0, 2.0, 2.0])


@pytest.mark.e2e
def test_concurrent_post_flow_runs_on_the_real_stack(idp, tiled_server, prefect_stack):
    from visitflow.core import names as grants

    from tests.flow.test_flows_e2e import delegate

    uid = run_scan(tiled_server.uri, idp.token("alice"), num=12)
    delegate(idp, prefect_stack, "saxs_average", "a1", uid)
    runs = [prefect_stack.run("saxs_average", "post", "a1", uid, wait=False,
                              idempotency_key=grants.idempotency_key("saxs_average", "post", "a1", uid) + f"/rerun-{i}")
            for i in range(3)]
    done = [prefect_stack.api.wait_for_flow_run(r["id"], timeout=300) for r in runs]
    assert [d["state"]["type"] for d in done] == ["COMPLETED"] * 3, [prefect_stack.logs(d["id"]) for d in done]
    root = user_root(tiled_server.uri, idp.token("alice"))
    node = root[f"processed/a1/{uid}/saxs_average"]
    current = node.metadata["current"]
    children = {k: c.metadata for k, c in node.items()}
    assert current in children and children[current]["status"] == "complete"
    assert current in {f"post-{d['id'][:8]}" for d in done}
    assert_matches(read_result(node), reference_of("saxs_average", root[f"raw/a1/{uid}/primary"]))
