"""The live fence's decisions (visitflow/core/fence.py, visitflow/tiled/live_fence.py) and the
middleware's serialization of one flow run's fenced writes — pure logic, no servers."""

from __future__ import annotations

import asyncio

import pytest

from visitflow.core.fence import FENCE_HEADER, Fence, is_claim, parse_fence, recorded_fence
from visitflow.tiled.live_fence import FenceLocks, attempt_label, refusal
from visitflow.tiled.request_context import REQUEST, RequestContextMiddleware

RUN = "0f6c1f7e-0000-4000-8000-000000000001"
OTHER = "0f6c1f7e-0000-4000-8000-000000000002"
WHERE = "processed/a1/u1/saxs_average/live"


@pytest.mark.parametrize("value, expected", [
    (f"{RUN}/2", Fence(RUN, 2)), (f" {RUN}/10 ", Fence(RUN, 10)),
    (None, None), ("", None), (RUN, None), (f"{RUN}/0", None), (f"{RUN}/-1", None), (f"{RUN}/x", None),
    ("/3", None),
])
def test_parse_fence(value, expected):
    assert parse_fence(value) == expected


def test_header_and_metadata_round_trip():
    fence = Fence(RUN, 3)
    assert parse_fence(fence.header()) == fence
    assert recorded_fence({"fence": fence.metadata(), "status": "running"}) == fence


@pytest.mark.parametrize("metadata", [{}, {"fence": None}, {"fence": "x/1"}, {"fence": {"flow_run_id": RUN}},
                                      {"fence": {"flow_run_id": RUN, "attempt": "2"}},
                                      {"fence": {"flow_run_id": RUN, "attempt": True}}, None])
def test_unreadable_recorded_fence_is_none(metadata):
    assert recorded_fence(metadata) is None


def test_unclaimed_live_node_is_writable_by_anyone():
    assert refusal(None, None, WHERE, inside_live=True) is None
    assert refusal(None, Fence(RUN, 1), WHERE, inside_live=True) is None


def test_owner_and_later_attempt_write():
    assert refusal(Fence(RUN, 1), Fence(RUN, 1), WHERE, inside_live=True) is None
    assert refusal(Fence(RUN, 1), Fence(RUN, 2), WHERE, inside_live=True) is None   # the claim


def test_older_attempt_is_refused_everywhere_with_the_reason():
    for inside in (True, False):
        reason = refusal(Fence(RUN, 2), Fence(RUN, 1), WHERE, inside_live=inside)
        assert reason is not None and reason.startswith("live fence:")
        assert "attempt 1 was superseded by attempt 2" in reason and WHERE in reason


def test_inside_live_a_write_without_fence_or_from_another_flow_run_is_refused():
    reason = refusal(Fence(RUN, 1), None, WHERE, inside_live=True)
    assert reason and FENCE_HEADER in reason and RUN in reason
    reason = refusal(Fence(RUN, 1), Fence(OTHER, 5), WHERE, inside_live=True)
    assert reason and f"owned by flow run {RUN}, not {OTHER}" in reason


def test_on_the_analysis_node_only_a_superseded_fence_is_refused():
    """Post runs write the analysis node's pointer with no fence; another flow run's fence is
    not live's concern there either."""
    assert refusal(Fence(RUN, 1), None, WHERE, inside_live=False) is None
    assert refusal(Fence(RUN, 1), Fence(OTHER, 1), WHERE, inside_live=False) is None


def test_malformed_header_is_refused():
    reason = refusal(None, None, WHERE, inside_live=True, malformed=True)
    assert reason and "must be '<flow run id>/<attempt>'" in reason


def test_fence_locks_serialize_one_flow_run_and_not_others():
    order: list[str] = []

    async def work(name: str, pause: float):
        order.append(f"{name}+")
        await asyncio.sleep(pause)
        order.append(f"{name}-")

    async def main():
        locks = FenceLocks()
        await asyncio.gather(locks.run(RUN, lambda: work("a", 0.05)), locks.run(RUN, lambda: work("b", 0)),
                             locks.run(OTHER, lambda: work("c", 0)))
        return locks

    locks = asyncio.run(main())
    assert order.index("a-") < order.index("b+"), order      # same flow run: one after the other
    assert order.index("c+") < order.index("a-"), order      # another flow run: not held up
    assert len(locks) == 0, "idle flow runs' locks are dropped"


def _scope(method: str, path: str, fence: str | None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if fence is not None:
        headers.append((FENCE_HEADER.encode(), fence.encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers}


def test_middleware_publishes_the_fence_and_serializes_fenced_writes():
    seen, active, overlap = [], [0], [0]

    async def app(scope, receive, send):
        info = REQUEST.get()
        seen.append((info.method, info.fence))
        active[0] += 1
        overlap[0] = max(overlap[0], active[0])
        await asyncio.sleep(0.02)
        active[0] -= 1

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        pass

    mw = RequestContextMiddleware(app)
    path = f"/api/v1/array/full/{WHERE}/average"

    async def main():
        await asyncio.gather(*(mw(_scope("PUT", path, f"{RUN}/{n}"), receive, send) for n in (1, 2, 3)))
        concurrent = overlap[0]
        overlap[0] = 0
        await asyncio.gather(mw(_scope("GET", path, f"{RUN}/1"), receive, send),
                             mw(_scope("GET", path, f"{RUN}/2"), receive, send))
        return concurrent

    assert asyncio.run(main()) == 1, "fenced writes of one flow run ran at the same time"
    assert overlap[0] == 2, "reads are not serialized"
    assert ("PUT", f"{RUN}/2") in seen and ("GET", f"{RUN}/1") in seen


def test_the_metric_label_set_is_bounded():
    assert [attempt_label(n) for n in (1, 2, 20, 21, 10**9)] == ["1", "2", "20", ">20", ">20"]


def test_a_claim_is_marked_in_the_header_and_parses_to_the_same_fence():
    fence = Fence(RUN, 3)
    assert fence.header(claim=True) == f"{RUN}/3;claim"
    assert parse_fence(fence.header(claim=True)) == fence
    assert is_claim(fence.header(claim=True)) and not is_claim(fence.header())
    assert not is_claim(";claim") and not is_claim(f"{RUN}/x;claim") and not is_claim(None)


def test_a_new_flow_run_takes_the_live_node_over_only_by_a_claim():
    """A cancelled live run restarted as a new flow run resumes (its claim is allowed); the
    old flow run's ordinary writes stay refused, and within one flow run an older attempt's
    claim is refused like its other writes."""
    assert refusal(Fence(RUN, 1), Fence(OTHER, 1), WHERE, inside_live=True, claim=True) is None
    assert refusal(Fence(RUN, 1), Fence(OTHER, 1), WHERE, inside_live=True, claim=False)
    reason = refusal(Fence(RUN, 2), Fence(RUN, 1), WHERE, inside_live=True, claim=True)
    assert reason and "attempt 1 was superseded by attempt 2" in reason
