"""A scan three times longer than the user's token, through blueapi in service-account mode.

Its own stack (tests/fixtures/blueapi_stack.py ``running_stack``) whose dev IdP is the shipped
deployments/idp.yaml overlaid (in the test; the file is not edited) with ``lifetimes.access: 30``
(user tokens live 30 s) and ``audiences.tiled.access: 60`` (the flows' data tokens live 60 s;
the Block refreshes them 30 s before expiry, so every ~30 s; the ``visitflow`` audience keeps
its own long T_grant life).  A 90-frame scan at ~1 frame/s: blueapi's service account writes it all (its
client refreshes itself), the trigger exchanged Alice's token at the start document while it
was fresh, the live analysis follows the whole scan across several data-token refreshes and
the post analysis reads it all — each flow run completing on its first attempt.

And the websocket *reconnect* (issue 19: before, Tiled answered the live source's
subscriptions with 404 — with ``--allow-anonymous`` Tiled 0.2.20 never reads the first-message
token — and the source polled): the live flow's ``live source:`` line says it followed by
push, and its data feed was closed by the gate when its token expired (4001) and connected
again with a fresh one.
"""

from __future__ import annotations

import ast
import re

import pytest

from visitflow.core.prefect_api import PrefectAPI
from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.core.tokens import unverified_claims

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.waiting import wait_until
from tests.trigger.test_blueapi import outputs_of, run_uid, wait_flow_runs

pytestmark = pytest.mark.blueapi

LIFETIME = 30        # seconds: user tokens
DATA_LIFETIME = 60   # seconds: data tokens (aud tiled)
FRAMES, DELAY = 90, 1.0


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory, blueapi_venv):
    tmp = tmp_path_factory.mktemp("blueapi-long")
    with bs.running_stack(tmp, idp_lifetimes={"access": LIFETIME},
                          idp_audience_lifetimes={"tiled": {"access": DATA_LIFETIME}}) as stack:
        with stack.service_account_blueapi(tmp / "blueapi-sa") as sa:
            yield stack, sa


def _logs(api: PrefectAPI, flow_run_id: str) -> str:
    out, offset = [], 0
    while True:
        rows = api.request("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                         "limit": 200, "offset": offset, "sort": "TIMESTAMP_ASC"})
        out += [r["message"] for r in rows]
        if len(rows) < 200:
            return "\n".join(out)
        offset += 200


def test_a_90s_scan_with_30s_user_tokens_completes_live_and_post(short_lived):
    stack, sa = short_lived
    alice = stack.token("alice")
    claims = unverified_claims(alice)
    assert claims["exp"] - claims["iat"] == LIFETIME          # the overlay is in force
    # Fresh tokens for blueapi's REST calls (polling outlives any one token); the scan itself
    # is written by the service account.
    task = sa.run(lambda: stack.token("alice"), "peak_scan", {"num": FRAMES, "seed": 7, "delay": DELAY},
                  timeout=FRAMES * DELAY * 4 + 300)
    uid = run_uid(task)
    reader = lambda: stack.token("alice")  # noqa: E731
    root = connect(stack.tiled.uri, BearerAuth(reader))
    raw = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}"]
    assert raw.metadata["stop"]["exit_status"] == "success"
    assert raw["primary"]["det"].read().shape == (FRAMES,)
    start, stop = raw.metadata["start"]["time"], raw.metadata["stop"]["time"]
    assert stop - start > 2 * LIFETIME, f"the scan took {stop - start:.0f}s: not longer than the tokens"

    api = PrefectAPI(stack.prefect_api)
    try:
        runs = wait_flow_runs(api, uid, 2)
        assert len(runs) == 2, runs
        want = reference_of("peak_stats", raw["primary"])
        node = root[f"processed/{bs.SESSION}/{uid}/peak_stats"]
        for r in runs:
            done = api.wait_for_flow_run(r["id"], timeout=FRAMES * DELAY * 3 + 300)
            assert done["state"]["type"] == "COMPLETED", (r["name"], done["state"])
            assert done["run_count"] == 1, "retried"
        live = node["live"]
        post = next(node[k] for k in node if k.startswith("post-"))
        for child in (live, post):
            assert child.metadata["status"] == "complete"
            assert child.metadata["frames_processed"] == FRAMES
            assert_matches(outputs_of(child), want, rtol=1e-9, atol=1e-9, where="peak_stats/")
        # Logs are shipped in batches and can trail the final state: wait for the done line.
        live_run = next(r for r in runs if "variant:live" in r["tags"])
        def done_line():
            text = _logs(api, live_run["id"])
            return text if "data token refreshed" in text else None

        logs = wait_until(done_line, 90, "the live flow's done line never reached Prefect")
        m = re.search(r"data token refreshed (\d+) times", logs)
        assert m and int(m[1]) >= 2, logs[-3000:]
        assert "complete: %d/%d frames" % (FRAMES, FRAMES) in logs, logs[-3000:]
        source = re.search(r"live source: (\{.*\})", logs)
        print(f"long scan: {stop - start:.0f}s, live data token refreshes {m[1]}, live source {source and source[1]}")
        assert source, logs[-3000:]
        stats = ast.literal_eval(source[1])
        assert stats["followed_by"] == "push", stats
        feed = max(stats["subscriptions"].values(), key=lambda s: s["messages"])
        assert feed["messages"] > 0 and feed["connects"] >= 2, stats   # reconnected with a fresh token
    finally:
        api.close()
