"""Live analyses started through blueapi follow the run by PUSH (issue 19, the bug found
while testing long scans), on the blueapi stack's real Tiled — started with
``--allow-anonymous``, as blueapi's tiled 0.2.18 client needs.

Such a Tiled never reads a websocket's first message, so a data token sent there left the
subscription anonymous: every node answered 404 and the live source silently polled.  The
source now sends the token in the upgrade request's ``Authorization: Bearer`` header
(visitflow.flow.push; AuthGate hands it to Tiled).  Made observable by the live flow's
``live source: {...}`` log line (``followed_by``, per-subscription ``auth``/``disabled``).

The negatives, on the same anonymous-allowing Tiled: a bad, expired or other-visit token on
the handshake is refused with a reason (HTTP status and detail, never a 500) and no message;
no token at all is not an anonymous way in to the data either.
"""

from __future__ import annotations

import ast
import re
import time

import pytest

from visitflow.core.prefect_api import PrefectAPI
from visitflow.core.tiled_client import BearerAuth, connect

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.stream_helpers import receive
from tests.trigger.test_blueapi import outputs_of, run_uid, wait_flow_runs

pytestmark = pytest.mark.blueapi

NUM, DELAY = 24, 0.4     # ~10 s of scan: the live flow is following while the run is written
DATA = {"array-data", "array-ref", "table-data", "container-child-created", "container-child-metadata-updated"}


@pytest.fixture(scope="module")
def scanned(blueapi, prefect):
    """A peak_scan through blueapi as alice; its live flow run, finished."""
    alice = blueapi.token("alice")
    uid = run_uid(blueapi.blueapi.run(alice, "peak_scan", {"num": NUM, "seed": 5, "delay": DELAY}, 300))
    runs = wait_flow_runs(prefect, uid, 2)
    live = next(r for r in runs if "variant:live" in r["tags"])
    done = prefect.wait_for_flow_run(live["id"], timeout=300)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    return {"uid": uid, "live": live, "alice": alice}


def _logs(api: PrefectAPI, flow_run_id: str, wait_for: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        rows = api.request("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                         "limit": 200, "sort": "TIMESTAMP_DESC"})
        text = "\n".join(r["message"] for r in rows)
        if wait_for in text or time.monotonic() > deadline:
            return text
        time.sleep(1.0)


def test_live_analysis_through_blueapi_follows_by_push(blueapi, prefect, scanned):
    logs = _logs(prefect, scanned["live"]["id"], "live source:")
    m = re.search(r"live source: (\{.*\})", logs)
    assert m, f"the live flow did not report its source:\n{logs[-2000:]}"
    source = ast.literal_eval(m.group(1))
    assert source["followed_by"] == "push", source
    assert source["push_reads"] > 0 and source["push_reads"] >= source["http_reads"], source
    feeds = {url: s for url, s in source["subscriptions"].items() if s["messages"]}
    assert feeds, source
    for url, sub in source["subscriptions"].items():
        assert not sub["disabled"] and sub["auth"] == "header", (url, sub)
        assert "404" not in (sub["close"] or ""), (url, sub)
    # and what it computed by push is the analysis of the raw run (independent numpy)
    root = connect(blueapi.tiled.uri, BearerAuth(lambda: scanned["alice"]))
    raw = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{scanned['uid']}"]
    live = root[f"processed/{bs.SESSION}/{scanned['uid']}/peak_stats/live"]
    assert live.metadata["status"] == "complete" and live.metadata["frames_processed"] == NUM
    assert_matches(outputs_of(live), reference_of("peak_stats", raw["primary"]), rtol=1e-9, atol=1e-9,
                   where="live by push/")


def _table_path(blueapi, token: str, uid: str) -> str:
    root = connect(blueapi.tiled.uri, BearerAuth(lambda: token))
    base = f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}/primary"
    stream = root[base]
    stream = getattr(stream, "base", stream)   # a composite's own children, not its flattened columns
    key = next(k for k in stream if getattr(stream[k], "structure_family", None) == "table")
    return f"{base}/{key}"


def _bearer(token):
    return dict(headers=[("Authorization", f"Bearer {token}")])


def test_handshake_header_token_control_streams_the_run(blueapi, scanned):
    path = _table_path(blueapi, scanned["alice"], scanned["uid"])
    got = receive(blueapi.tiled.uri, path, duration=3.0, **_bearer(scanned["alice"]))
    assert got["status"] is None and got["messages"], got
    assert [m for m in got["messages"] if m.get("type") == "table-data"], [m.get("type") for m in got["messages"]]


@pytest.mark.parametrize("case", ["expired", "garbage", "foreign_key", "other_visit", "no_token"])
def test_bad_handshake_tokens_are_refused_with_a_reason(blueapi, scanned, case):
    idp, uid = blueapi.idp, scanned["uid"]
    path = _table_path(blueapi, scanned["alice"], uid)
    now = int(time.time())
    token = {
        "expired": lambda: idp.sign(idp.claims(exp=now - 120, iat=now - 600, nbf=now - 600)),
        "garbage": lambda: "not.a.jwt",
        "foreign_key": lambda: idp.sign(idp.claims(), key=idp.other_key, headers={"kid": "not-published"}),
        "other_visit": lambda: blueapi.token("bob"),     # b21's user: no part of i22's visit
        "no_token": lambda: None,
    }[case]()
    got = receive(blueapi.tiled.uri, path, duration=3.0, **(_bearer(token) if token else {}))
    assert not [m for m in got["messages"] if m.get("type") in DATA], got
    assert not got["messages"], got
    assert got["status"] != 500, got
    if case in ("expired", "garbage", "foreign_key"):
        assert got["status"] == 401 and got["body"], got               # the reason, in the body
    else:  # authenticated as someone without the visit, or anonymous: the node does not exist for them
        assert got["status"] in (403, 404) and got["body"], got
