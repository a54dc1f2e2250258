"""The token service is unreachable at the start document for longer than the user's token
lives: the trigger retries while the token lives, then records the failure in Prefect (a
Failed flow run per analysis run, with the reason and the way back, no secret), exactly once;
``visitflow trigger`` with a fresh token recovers.  Pure logic first, then the real IdP
(cut off by a proxy), the real Prefect server + worker, Tiled and a RunEngine scan."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import jwt
import pytest

from visitflow.core import names as grants
from visitflow.core.prefect_api import PrefectAPI
from visitflow.trigger import AnalysisTrigger, TriggerSettings
from visitflow.trigger import outage
from visitflow.trigger.cli import parse_options

from visitflow.stack.services import start_service

from tests.fixtures.scans import run_scan, user_root

SECRET = "blueapi-dev-secret"
OPTIONS = {"background": 1.5}


def settings_for(tmp_path, issuer, prefect="http://127.0.0.1:9/api", **kw):
    return TriggerSettings(issuer=issuer, prefect_api_url=prefect, client_secret=SECRET,
                           state_dir=tmp_path / "trigger", max_backoff=1.0, **kw)


def unsigned(exp: float, **claims) -> str:
    """A JWT-shaped token with a chosen ``exp`` (the trigger reads exp without verifying)."""
    return jwt.encode({"sub": "alice", "exp": int(exp), **claims}, "k" * 32, algorithm="HS256")


# ------------------------------------------------------------------ pure logic
def test_retry_in_stops_before_the_token_dies():
    now = 1000.0
    assert outage.retry_in(0.5, now + 60, now) == 0.5
    assert outage.retry_in(60, now + 10, now) == pytest.approx(10 - outage.LAST_TRY_MARGIN)  # last try just before exp
    assert outage.retry_in(60, now + outage.LAST_TRY_MARGIN, now) is None
    assert outage.retry_in(1, now - 5, now) is None


def test_token_expiry_is_read_without_verifying():
    assert outage.token_expiry(unsigned(1234567890)) == 1234567890.0
    assert outage.token_expiry("not-a-jwt") is None
    assert outage.token_expiry(jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")) is None


def test_the_reason_names_the_way_back_and_holds_no_secret():
    token = unsigned(time.time() + 60)
    reason = outage.unreachable_reason(
        issuer="http://idp", since=0, attempts=7, last_error=f"token {token} refused with {SECRET}",
        expires_at=60, analysis="peak_stats", visit="a1", run="r-1", options=OPTIONS, secrets=(SECRET,))
    assert "could not be reached" in reason and "7 attempts" in reason and "1970-01-01T00:01:00Z" in reason
    assert token not in reason and "eyJ" not in reason and SECRET not in reason
    cmd = reason.split("the user runs: ")[1]
    argv = shlex.split(cmd)
    assert argv[:2] == ["visitflow", "trigger"] and argv[argv.index("--run") + 1] == "r-1"
    assert parse_options(argv[argv.index("--options") + 1]) == OPTIONS


def test_parse_options():
    assert parse_options(None) == {} and parse_options('{"background": 2}') == {"background": 2}
    for bad in ("[1]", "{nope", '"x"'):
        with pytest.raises(ValueError):
            parse_options(bad)


def test_gives_up_when_the_token_dies_and_keeps_the_record_until_prefect_answers(tmp_path):
    """IdP and Prefect both unreachable (closed ports): retried until the token's exp, then
    every request waits, durably, to be recorded as Failed in Prefect."""
    life = 3
    exp = int(time.time()) + life
    trig = AnalysisTrigger(settings_for(tmp_path, "http://127.0.0.1:9"), token=unsigned(exp), start_sender=False)
    trig("start", {"uid": "u1", "analyses": ["peak_stats"], "instrument_session": "a1"})
    trig("stop", {"run_start": "u1", "exit_status": "success"})
    t0 = time.monotonic()
    with PrefectAPI("http://127.0.0.1:9/api", attempts=1) as api:
        while trig.outbox.grant("peak_stats", "a1", "u1").state == "exchange" and time.monotonic() - t0 < life + 30:
            trig.send_once(api)
            time.sleep(0.1)
    g = trig.outbox.grant("peak_stats", "a1", "u1")
    assert g.state == "failed" and time.time() >= exp - outage.LAST_TRY_MARGIN - 0.1, "gave up too early"
    requests = trig.outbox.requests()
    assert {r.state for r in requests} == {"report"} and len(requests) == 2
    assert all("could not be reached" in r.error and " attempt" in r.error for r in requests)
    assert not trig.holds_token_for("u1"), "the dead token is dropped"
    assert trig.outbox.pending_count() == 2, "the failure records are still to be sent"
    assert any(d.startswith("FAILED peak_stats") for d in trig.decisions)
    trig.close()


def test_a_lost_user_token_is_recorded_the_same_way(tmp_path):
    """blueapi restarted before the exchange: the token (memory only) is gone."""
    first = AnalysisTrigger(settings_for(tmp_path, "http://127.0.0.1:9"), token=unsigned(time.time() + 60),
                            start_sender=False)
    first("start", {"uid": "u1", "analyses": ["peak_stats"], "instrument_session": "a1"})
    first.close()
    again = AnalysisTrigger(settings_for(tmp_path, "http://127.0.0.1:9"), token="unused", start_sender=False)
    _exchange_once(again)
    (r,) = again.outbox.requests()
    assert r.state == "report" and "trigger restarted" in r.error and "visitflow trigger" in r.error
    again.close()


def test_died_during_outage():
    now = 1000.0
    assert outage.died_during_outage("invalid_token", now + 5, now)
    assert outage.died_during_outage("invalid_grant", now - 5, now)
    assert not outage.died_during_outage("invalid_token", now + outage.CLOCK_SKEW + 1, now)
    assert not outage.died_during_outage("invalid_scope", now + 5, now)
    assert not outage.died_during_outage("access_denied", now - 5, now)


def _exchange_once(trig, api_url="http://127.0.0.1:9/api"):
    with PrefectAPI(api_url, attempts=1) as api:
        trig.send_once(api)


@pytest.mark.parametrize("after_outage", [False, True])
def test_an_invalid_token_near_its_expiry_after_an_outage_is_an_outage(tmp_path, idp, after_outage):
    """The real token service calls the subject token invalid (here: signed with a key it
    never published) while the token is seconds from its exp.  First contact: a refusal, no
    flow run, as before.  After failed attempts (the outage): the token died meanwhile, as far
    as the trigger can tell, so the runs are recorded as Failed with the outage's reason."""
    now = int(time.time())
    token = idp.sign(idp.claims(exp=now + 10, scope="run:peak_stats:a1"), key=idp.other_key)
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer), token=token, start_sender=False)
    trig("start", {"uid": "u1", "analyses": ["peak_stats"], "instrument_session": "a1"})
    if after_outage:
        trig.outbox.set_grant(trig.outbox.grant("peak_stats", "a1", "u1"), state="exchange",
                              error="token endpoint unreachable", retry_in=0)
    _exchange_once(trig)
    (r,) = trig.outbox.requests()
    if after_outage:
        assert trig.outbox.grant("peak_stats", "a1", "u1").state == "failed"
        assert r.state == "report" and "could not be reached" in r.error and "1 attempt," in r.error, r.error
    else:
        assert r.state == "refused" and "invalid_token" in r.error
    trig.close()


# ------------------------------------------------------------------ real servers
def outage_plan(det, saxs, motor, md):
    import bluesky.plans as bp

    from visitflow.trigger.plans import uses_analyses

    @uses_analyses("peak_stats", options={"peak_stats": OPTIONS})
    def scan():
        return (yield from bp.scan([det, saxs], motor, -2, 2, 9, md=md))

    return scan()


def failed_state_events(api, flow_run_id: str, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = api.request("POST", "/events/filter", json={"filter": {
            "event": {"name": ["prefect.flow-run.Failed"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
            "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 5})
        events = found.get("events", []) if isinstance(found, dict) else []
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1)


class StoppedIdP:
    """Stop the session's real IdP process; ``back()`` starts it again on the same port with
    the same keys directory (its keys and revocations persist), as an operator would."""

    def __init__(self, idp):
        self.idp = idp
        idp.service.stop()

    def back(self) -> None:
        if self.idp.service.process.poll() is None:
            return
        old = self.idp.service
        self.idp.service = start_service(old.name, old.argv, log_dir=old.log_path.parent, health_url=old.health_url)
        self.idp.service.wait_ready(timeout=60)


@pytest.mark.e2e
def test_idp_outage_at_start_is_recorded_in_prefect_then_visitflow_trigger_recovers(
        tmp_path, idp, tiled_server, prefect_stack):
    life = 20
    # A real RunEngine scan into Tiled (which checks tokens against the IdP's keys, so it
    # runs first); its documents then reach the trigger while the token service is down,
    # with a user token that has `life` seconds left (one minted by the IdP's own key).
    docs: list = []
    uid = run_scan(tiled_server.uri, idp.token("alice"), plan=outage_plan,
                   subscribers=[lambda name, doc: docs.append((name, doc))])
    down = StoppedIdP(idp)
    try:
        now = int(time.time())
        user_token = idp.sign(idp.claims(sub="alice", exp=now + life, iat=now, nbf=now,
                                         scope="read:data:a1 write:data:a1 run:peak_stats:a1"))
        trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=user_token)
        for name, doc in docs:
            trig(name, doc)
        assert trig.flush(life + 90), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
        trig.close()
        assert time.time() >= now + life - outage.LAST_TRY_MARGIN - 1, "gave up before the token died"
        failed = [d for d in trig.decisions if d.startswith("FAILED peak_stats")]
        assert len(failed) == 1 and "could not be reached" in failed[0], trig.decisions
        attempts = int(re.search(r"\((\d+) attempts?, last:", failed[0]).group(1))
        assert attempts >= 3, f"the trigger kept trying while the token lived: {failed[0]}"

        # Visible through the Prefect API (what the UI shows): Failed runs of the deployments,
        # the trigger's own keys, the reason and the way back in the state message, no secret.
        api = prefect_stack.api
        runs = {r["name"].split()[0]: r for r in api.flow_runs(tags=[f"run:{uid}"])}
        assert set(runs) == {"peak-stats/live", "peak-stats/post"}, list(runs)
        for variant in ("live", "post"):
            r = api.flow_run(runs[f"peak-stats/{variant}"]["id"])
            assert r["state"]["type"] == "FAILED", r["state"]
            assert r["idempotency_key"] == grants.idempotency_key("peak_stats", variant, "a1", uid, OPTIONS)
            assert r["parameters"] == {"visit": "a1", "run_id": uid, **OPTIONS}
            message = r["state"]["message"]
            assert "could not be reached" in message and "expired at" in message and idp.issuer in message, message
            assert f"visitflow trigger --analysis peak_stats --visit a1 --run {uid}" in message, message
            blob = json.dumps(r)
            assert "eyJ" not in blob and SECRET not in blob and user_token not in blob, "a secret reached Prefect"
        assert failed_state_events(api, runs["peak-stats/post"]["id"]), \
            "the Failed state is also Prefect's own prefect.flow-run.Failed event (for automations)"

        # Not duplicated: a restarted trigger on the same outbox, and another trigger with a
        # fresh outbox replaying the start document with the now dead token, change nothing.
        again = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=user_token)
        assert again.flush(30)
        again.close()
        other = AnalysisTrigger(settings_for(tmp_path / "other", idp.issuer, prefect_stack.api_url), token=user_token)
        other("start", {"uid": uid, "analyses": ["peak_stats"], "instrument_session": "a1",
                        "analysis_options": {"peak_stats": OPTIONS}})
        assert other.flush(60), [(r.key, r.state, r.error) for r in other.outbox.requests()]
        (replayed,) = other.outbox.requests()
        other.close()
        assert replayed.flow_run_id == runs["peak-stats/live"]["id"], "the same Failed run, not a second"
        assert len(api.flow_runs(tags=[f"run:{uid}"])) == 2
    finally:
        down.back()

    # The token service is back: the user runs the command the message names, with a fresh token.
    message = api.flow_run(runs["peak-stats/post"]["id"])["state"]["message"]
    command = shlex.split(message.split("the user runs: ")[1])
    assert command[:2] == ["visitflow", "trigger"] and command[-3:] == ["--token-env", "<VAR>", "--wait"]
    argv = [sys.executable, "-m", "visitflow.cli", *command[1:-3], "--token-env", "VF_TOKEN", "--wait",
            "--wait-timeout", "240", "--issuer", idp.issuer, "--prefect-api", prefect_stack.api_url]
    env = {**os.environ, "VF_TOKEN": idp.token("alice"), "VISITFLOW_TRIGGER_CLIENT_SECRET": SECRET}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "peak-stats/post" in done.stdout and "COMPLETED" in done.stdout, done.stdout
    node = user_root(tiled_server.uri, idp.token("alice"))[f"processed/a1/{uid}/peak_stats"]
    current = node[node.metadata["current"]].metadata
    assert current["options"] == OPTIONS and current["frames_processed"] == 9
    states = sorted(r["state"]["type"] for r in api.flow_runs(tags=[f"run:{uid}"]))
    assert states == ["COMPLETED", "FAILED", "FAILED"], states
