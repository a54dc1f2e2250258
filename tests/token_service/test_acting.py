"""Staff recovery's pure rules (visitflow/token_service/acting.py): only one run's scopes may be
asked for when acting for a user, and the staff command the Failed run's message gives
(visitflow/trigger/outage.py).  The decisions on real servers: tests/ops/test_staff_recovery.py."""

from __future__ import annotations

import shlex

import jwt
import pytest

from visitflow.errors import OAuthError
from visitflow.token_service.acting import one_run
from visitflow.trigger import outage
from visitflow.trigger.cli import parse_options


def test_one_runs_scopes_are_accepted_with_their_visit():
    scopes, visit = one_run("run:peak_stats:a1 read:raw:a1/r-1 write:processed:a1/r-1")
    assert visit == "a1" and {str(s) for s in scopes} == {"run:peak_stats:a1", "read:raw:a1/r-1",
                                                         "write:processed:a1/r-1"}


@pytest.mark.parametrize("scope, says", [
    (None, "needs the run's scopes"),
    ("", "needs the run's scopes"),
    ("run:peak_stats:a1 read:raw:a1", "never a whole visit"),
    ("run:peak_stats:a1 read:data:a1/r-1 write:processed:a1/r-2", "never a whole visit"),
    ("run:peak_stats:a1 run:peak_stats:a2 read:raw:a1/r-1", "one visit (asked for 2)"),
    ("read:raw:a1/r-1 write:processed:a1/r-1", "a run:<analysis>:<visit> scope"),
    ("run:peak_stats:a1 read:raw:a1/r-1 openid", "only run: and data scopes"),
    ("run:peak stats:a1", ""),       # malformed: the parser's reason
])
def test_anything_wider_than_one_run_is_invalid_scope(scope, says):
    with pytest.raises(OAuthError) as caught:
        one_run(scope)
    assert caught.value.error == "invalid_scope" and caught.value.status == 403
    assert says in caught.value.description


def test_the_failed_runs_message_gives_the_staff_command_first_and_the_users_after():
    token = jwt.encode({"sub": "0b7c-uuid", "preferred_username": "alice", "exp": 60}, "k" * 32, algorithm="HS256")
    reason = outage.unreachable_reason(user=outage.user_of(token), issuer="http://ts", since=0, attempts=3,
                                       last_error="down", expires_at=60, analysis="peak_stats", visit="a1",
                                       run="r-1", options={"background": 1.5})
    staff = shlex.split(reason.split("facility staff run, with their own login: ")[1].split(" ; or the user runs: ")[0])
    user = shlex.split(reason.split("the user runs: ")[1])
    assert staff[staff.index("--for") + 1] == "alice", "named as OPA names users (preferred_username over sub)"
    assert staff[:staff.index("--for")] == user[:user.index("--token-env")]
    assert staff[-3:] == user[-3:] == ["--token-env", "<VAR>", "--wait"]
    assert parse_options(staff[staff.index("--options") + 1]) == {"background": 1.5}
    assert "eyJ" not in reason


def test_user_of_follows_the_authoritys_naming_rule():
    enc = lambda claims: jwt.encode(claims, "k" * 32, algorithm="HS256")
    assert outage.user_of(enc({"sub": "x", "preferred_username": "p", "fedid": "abc12345"})) == "abc12345"
    assert outage.user_of(enc({"sub": "x"})) == "x"
    assert outage.user_of("not-a-jwt") is None and outage.user_of(None) is None
    lost = outage.lost_token_reason(analysis="peak_stats", visit="a1", run="r-1")
    assert "--for <USER>" in lost, "no token left to name the user: staff fill it in"


def test_opa_is_asked_act_for_with_the_staff_identity_and_the_user_and_answers_are_cached():
    import json

    import httpx

    from visitflow.core.authority import OPAAuthority, ScopesAuthority, Subject

    asked = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.path, json.loads(request.content)["input"]))
        return httpx.Response(200, json={"result": {"allow": False, "reason": "carol may not act for alice"}})

    opa = OPAAuthority("http://opa", transport=httpx.MockTransport(answer), cache_seconds=60)
    carol = Subject.from_claims({"sub": "c", "preferred_username": "carol", "scope": "openid"})
    for _ in range(2):
        d = opa.may_act_for(carol, "alice", "a1")
        assert not d.allow and d.reason == "carol may not act for alice"
    assert asked == [("/v1/data/visitflow/authz/decision", {
        "subject": {"sub": "c", "preferred_username": "carol"}, "action": "act_for", "visit": "a1",
        "for_user": "alice"})], "asked once (cached), scopes never sent"
    assert not ScopesAuthority().may_act_for(carol, "alice", "a1").allow, "token scopes cannot say who is staff"
