"""OPAAuthority's answers, failures and cache window on an ``httpx.MockTransport`` and a clock
moved by hand (no OPA server, no sleeping).  tests/core/test_authority.py asks the real OPA
with the shipped policy; these pin how the client reads OPA's answers and when it asks."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.fixtures.scripted_http import Clock, ScriptedServer, refused_connection
from visitflow.core.authority import OPAAuthority, Subject, decide_scopes
from visitflow.core.scopes import grant_scopes
from visitflow.errors import AuthorityUnavailable

OPA = "http://opa.test:8181/"
DECISION = "/v1/data/visitflow/authz/decision"
VISITS = "/v1/data/visitflow/authz/readable_visits"
ALICE = Subject.from_claims({"iss": "https://facility", "sub": "f3a1", "preferred_username": "alice",
                             "scope": "openid read:data:a9"})
BOB = Subject.from_claims({"sub": "b-uuid", "preferred_username": "bob"})


def result(value) -> httpx.Response:
    return httpx.Response(200, json={"result": value})


def authority(server: ScriptedServer, **kw) -> OPAAuthority:
    kw.setdefault("cache_seconds", 0)
    return OPAAuthority(OPA, transport=server.transport, **kw)


# ------------------------------------------------------------------ answers
def test_allow_and_deny_carry_opas_reason_and_the_question_is_the_documented_input():
    server = ScriptedServer().on("POST", DECISION,
                                 result({"allow": True, "reason": "alice may run saxs_average on session a1"}),
                                 result({"allow": False, "reason": "alice is neither a member of session a2 nor staff"}))
    a = authority(server)
    ok = a.may_run(ALICE, "saxs_average", "a1")
    assert ok and ok.reason == "alice may run saxs_average on session a1"
    no = a.may_access(ALICE, "read", "raw", "a2", "r7")
    assert not no and no.reason == "alice is neither a member of session a2 nor staff"
    run_q, access_q = server.bodies("POST", DECISION)
    subject = {"iss": "https://facility", "sub": "f3a1", "preferred_username": "alice"}   # never the scopes
    assert run_q == {"input": {"subject": subject, "action": "run", "store": None, "visit": "a1", "run": None,
                               "analysis": "saxs_average"}}
    assert access_q == {"input": {"subject": subject, "action": "read", "store": "raw", "visit": "a2", "run": "r7",
                                  "analysis": None}}
    assert all(str(r.url) == "http://opa.test:8181" + DECISION for r in server.requests)


def test_an_answer_without_a_reason_still_says_which_way_it_went():
    server = ScriptedServer().on("POST", DECISION, result({"allow": True}), result({"allow": False, "reason": ""}))
    a = authority(server)
    assert a.may_run(ALICE, "x", "a1").reason == "allowed"
    assert a.may_run(ALICE, "x", "a1").reason == "refused"


def test_a_dotted_package_is_a_path():
    server = ScriptedServer().on("POST", "/v1/data/site/policy/decision", result({"allow": True}))
    assert authority(server, package="site.policy").may_run(ALICE, "x", "a1")


def test_readable_visits_is_a_set_of_strings():
    server = ScriptedServer().on("POST", VISITS, result(["a1", "a2", "a1"]))
    assert authority(server).readable_visits(BOB) == {"a1", "a2"}
    assert server.bodies("POST", VISITS) == [{"input": {"subject": {"sub": "b-uuid", "preferred_username": "bob"}}}]


@pytest.mark.parametrize("answer", [{"allow": "yes"}, {"reason": "no allow"}, None, [True], "allow"])
def test_a_decision_without_a_boolean_allow_fails_closed(answer):
    a = authority(ScriptedServer().on("POST", DECISION, result(answer)))
    with pytest.raises(AuthorityUnavailable, match="without a boolean allow"):
        a.may_run(ALICE, "saxs_average", "a1")


@pytest.mark.parametrize("answer", [{"a1": True}, "a1", ["a1", 2], None])
def test_readable_visits_that_are_not_a_list_of_strings_fail_closed(answer):
    a = authority(ScriptedServer().on("POST", VISITS, result(answer)))
    with pytest.raises(AuthorityUnavailable, match="something other than a list"):
        a.readable_visits(ALICE)


def test_a_policy_that_is_not_loaded_fails_closed():
    a = authority(ScriptedServer().on("POST", DECISION, httpx.Response(200, json={})))
    with pytest.raises(AuthorityUnavailable, match="has no rule decision"):
        a.may_run(ALICE, "saxs_average", "a1")


def test_an_answer_that_is_not_json_fails_closed():
    a = authority(ScriptedServer().on("POST", DECISION, httpx.Response(200, text="<html>proxy</html>")))
    with pytest.raises(AuthorityUnavailable, match="sent no JSON for decision"):
        a.may_run(ALICE, "saxs_average", "a1")


@pytest.mark.parametrize("body", [b'"result"', b"5", b'["result"]', b"null"])
def test_json_that_is_not_an_object_fails_closed_as_unavailable(body):
    """It used to escape as a TypeError ("in" on a string, a list, a number, null): a 500,
    not the authority's fail-closed 503."""
    a = authority(ScriptedServer().on("POST", DECISION, httpx.Response(
        200, content=body, headers={"content-type": "application/json"})))
    with pytest.raises(AuthorityUnavailable, match="no JSON object"):
        a.may_run(ALICE, "saxs_average", "a1")


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_an_error_status_fails_closed_at_once_with_opas_words(status):
    server = ScriptedServer().on("POST", DECISION, httpx.Response(status, json={"code": "internal_error",
                                                                               "message": "eval_conflict_error"}))
    a = authority(server)
    with pytest.raises(AuthorityUnavailable, match=f"answered {status} for decision.*eval_conflict_error"):
        a.may_run(ALICE, "saxs_average", "a1")
    assert len(server.requests) == 1, "only a transport error is retried"


# ------------------------------------------------------------------ outages
def test_a_refused_connection_is_retried_once_then_fails_closed():
    server = ScriptedServer().on("POST", DECISION, refused_connection)
    a = authority(server)
    with pytest.raises(AuthorityUnavailable, match=r"OPA at http://opa.test:8181\) cannot be reached: ConnectError"):
        a.may_run(ALICE, "saxs_average", "a1")
    assert len(server.requests) == 2


def test_a_dropped_keep_alive_connection_is_not_an_outage():
    server = ScriptedServer().on("POST", DECISION, httpx.RemoteProtocolError("Server disconnected"),
                                 result({"allow": True, "reason": "ok"}))
    assert authority(server).may_run(ALICE, "saxs_average", "a1").reason == "ok"
    assert len(server.requests) == 2


# ------------------------------------------------------------------ the cache window
def test_answers_are_cached_for_the_window_then_asked_again():
    clock = Clock()
    server = ScriptedServer().on("POST", DECISION, result({"allow": True, "reason": "member"}),
                                 result({"allow": False, "reason": "no longer a member"}))
    a = authority(server, cache_seconds=5, clock=clock)
    assert a.may_access(ALICE, "read", "raw", "a1").reason == "member"
    clock.advance(4.9)
    assert a.may_access(ALICE, "read", "raw", "a1").reason == "member", "within the window: cached"
    assert len(server.requests) == 1
    clock.advance(0.2)
    refused = a.may_access(ALICE, "read", "raw", "a1")
    assert not refused and refused.reason == "no longer a member", "after the window: OPA is asked again"
    assert len(server.requests) == 2
    clock.advance(1)
    assert not a.may_access(ALICE, "read", "raw", "a1"), "the refusal is cached too"
    assert len(server.requests) == 2


def test_each_question_and_subject_has_its_own_cache_entry():
    clock = Clock()
    server = ScriptedServer().on("POST", DECISION, result({"allow": True}))
    a = authority(server, cache_seconds=60, clock=clock)
    a.may_access(ALICE, "read", "raw", "a1")
    a.may_access(ALICE, "read", "raw", "a1", "r1")
    a.may_access(ALICE, "write", "raw", "a1")
    a.may_access(BOB, "read", "raw", "a1")
    a.may_run(ALICE, "read", "a1")
    assert len(server.requests) == 5
    a.may_access(ALICE, "read", "raw", "a1", "r1")
    assert len(server.requests) == 5


def test_failures_are_never_cached():
    clock = Clock()
    server = ScriptedServer().on("POST", DECISION, httpx.Response(503, text="loading"), refused_connection,
                                 refused_connection, result({"allow": True, "reason": "back"}))
    a = authority(server, cache_seconds=60, clock=clock)
    for _ in range(2):
        with pytest.raises(AuthorityUnavailable):
            a.may_run(ALICE, "saxs_average", "a1")
    assert a.may_run(ALICE, "saxs_average", "a1").reason == "back"
    assert len(server.requests) == 4
    assert a.may_run(ALICE, "saxs_average", "a1").reason == "back" and len(server.requests) == 4


def test_no_cache_window_asks_every_time():
    server = ScriptedServer().on("POST", VISITS, result(["a1"]))
    a = authority(server, cache_seconds=0)
    for _ in range(3):
        assert a.readable_visits(ALICE) == {"a1"}
    assert len(server.requests) == 3


def test_readable_visits_are_cached_and_a_caller_cannot_change_the_cached_set():
    clock = Clock()
    server = ScriptedServer().on("POST", VISITS, result(["a1"]))
    a = authority(server, cache_seconds=5, clock=clock)
    a.readable_visits(ALICE).add("a2")
    assert a.readable_visits(ALICE) == {"a1"} and len(server.requests) == 1


# ------------------------------------------------------------------ async
def test_async_questions_share_the_transport_and_the_cache():
    clock = Clock()
    server = ScriptedServer().on("POST", DECISION, result({"allow": True, "reason": "member"}))
    server.on("POST", VISITS, result(["a1"]))
    a = authority(server, cache_seconds=5, clock=clock)

    async def ask():
        first = await a.amay_access(ALICE, "write", "processed", "a1", "r1")
        visits = await a.areadable_visits(ALICE)
        return first, visits

    first, visits = asyncio.run(ask())
    assert first.reason == "member" and visits == {"a1"}
    assert a.may_access(ALICE, "write", "processed", "a1", "r1").reason == "member"
    assert server.calls() == [("POST", DECISION), ("POST", VISITS)], "the sync question hit the async answer"
    (body,) = server.bodies("POST", DECISION)
    assert body["input"]["action"] == "write" and body["input"]["run"] == "r1"


def test_async_refused_connection_is_retried_once_then_fails_closed():
    server = ScriptedServer().on("POST", DECISION, refused_connection)
    a = authority(server)
    with pytest.raises(AuthorityUnavailable, match="cannot be reached"):
        asyncio.run(a.amay_access(ALICE, "read", "raw", "a1"))
    assert len(server.requests) == 2


# ------------------------------------------------------------------ decide_scopes over OPA
def test_decide_scopes_stops_at_the_first_refusal_and_passes_its_reason_on():
    def decide(request):
        inp = json.loads(request.content)["input"]
        if inp["action"] == "write":
            return result({"allow": False, "reason": f"alice may not write {inp['store']} of {inp['visit']}"})
        return result({"allow": True, "reason": f"{inp['action']} ok"})

    server = ScriptedServer().on("POST", DECISION, decide)
    d = decide_scopes(authority(server), ALICE, grant_scopes("saxs_average", "a1", "r1"))
    assert not d and d.reason == "alice may not write processed of a1"
    actions = [b["input"]["action"] for b in server.bodies("POST", DECISION)]
    assert actions[-1] == "write" and actions.count("write") == 1, actions
