"""The authority (visitflow.core.authority): Scopes (pure logic) and OPA (a real OPA server with
deployments/opa/authz.rego + data.json), plus the Rego unit tests run by ``opa test``."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.opa_fixtures import run_opa_tests
from visitflow.core.authority import OPAAuthority, ScopesAuthority, Subject, authority_from_config, decide_scopes
from visitflow.errors import AuthorityUnavailable, ConfigError
from visitflow.core.scopes import ScopeSet, grant_scopes

ALICE = Subject.from_claims({"iss": "https://facility", "sub": "f3a1-uuid", "preferred_username": "alice",
                             "scope": "openid profile"})
CAROL = Subject.from_claims({"sub": "c-uuid", "preferred_username": "carol"})
BOB = Subject.from_claims({"sub": "b-uuid", "preferred_username": "bob"})


# ------------------------------------------------------------------ Scopes (pure)
def test_scopes_authority_is_todays_rule():
    a = ScopesAuthority()
    s = Subject.from_claims({"sub": "alice", "scope": "read:data:a1 write:processed:a1/r1 run:saxs_average:a1"})
    assert a.may_run(s, "saxs_average", "a1")
    assert not a.may_run(s, "peak_stats", "a1")
    assert a.may_access(s, "read", "raw", "a1", "r9")
    assert a.may_access(s, "write", "processed", "a1", "r1")
    assert not a.may_access(s, "write", "processed", "a1", "r2")
    refused = a.may_access(s, "read", "raw", "a2")
    assert not refused and "does not cover read:raw:a2" in refused.reason
    assert a.readable_visits(s) == {"a1"}
    assert decide_scopes(a, s, ScopeSet.parse("run:saxs_average:a1 read:raw:a1/r1"))
    assert not decide_scopes(a, s, grant_scopes("saxs_average", "a1", "r2"))  # write:processed:a1/r2


def test_decide_scopes_refuses_what_the_token_service_does_not_mint():
    a = ScopesAuthority()
    s = Subject.from_claims({"sub": "x", "scope": "run:*:a1 read:data:a1 openid"})
    assert "no scope requested" in decide_scopes(a, s, ScopeSet()).reason
    assert "names no analysis" in decide_scopes(a, s, ScopeSet.parse("run:*:a1")).reason
    assert "not one the token service mints" in decide_scopes(a, s, ScopeSet.parse("openid")).reason


def test_config():
    assert isinstance(authority_from_config(None), ScopesAuthority)
    opa = authority_from_config({"kind": "opa", "url": "http://127.0.0.1:1/", "cache_seconds": 1})
    assert isinstance(opa, OPAAuthority) and opa.url == "http://127.0.0.1:1"
    for bad in ({"kind": "ldap"}, {"kind": "opa"}, {"kind": "opa", "url": "x", "cahce": 1}, {"kind": "scopes", "x": 1}):
        with pytest.raises(ConfigError):
            authority_from_config(bad)


def test_subject_never_sends_scopes_to_opa():
    assert "scope" not in ALICE.policy_input() and ALICE.policy_input()["preferred_username"] == "alice"


# ------------------------------------------------------------------ OPA (real)


@pytest.mark.opa
def test_rego_unit_tests_pass():
    """``opa test deployments/opa``: authz_test.rego over authz.rego, and
    tiled_visitflow_test.rego over tiled_visitflow.rego and facility_tiled.rego (the Rego-only
    Tiled policy); each test file's own tests must be among those that passed."""
    proc = run_opa_tests()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "PASS: " in proc.stdout, proc.stdout
    for test_file in ("authz_test.rego", "tiled_visitflow_test.rego"):
        assert test_file in proc.stdout, f"opa test ran nothing of deployments/opa/{test_file}"


@pytest.mark.opa
def test_opa_answers_with_reasons(opa):
    a = OPAAuthority(opa.url, cache_seconds=0)
    ok = a.may_run(ALICE, "saxs_average", "a1")
    assert ok.allow and "alice may run saxs_average on session a1" in ok.reason
    carol = a.may_run(CAROL, "saxs_average", "a1")
    assert not carol and "carol may not start analyses on session a1" in carol.reason
    assert a.may_access(CAROL, "read", "raw", "a1", "r1")
    bob = a.may_access(BOB, "read", "raw", "a1")
    assert not bob and "bob is neither a member of session a1" in bob.reason
    assert a.readable_visits(ALICE) == {"a1"} and a.readable_visits(BOB) == {"a2"}
    d = decide_scopes(a, ALICE, grant_scopes("saxs_average", "a1", "r1"))
    assert d.allow, d.reason
    d = decide_scopes(a, CAROL, grant_scopes("saxs_average", "a1", "r1"))
    assert not d and "carol may not start analyses" in d.reason


@pytest.mark.opa
def test_async_questions_match(opa):
    import asyncio

    async def ask():
        a = OPAAuthority(opa.url, cache_seconds=0)
        assert (await a.amay_access(ALICE, "write", "processed", "a1", "r1")).allow
        assert not (await a.amay_access(BOB, "write", "processed", "a1", "r1")).allow
        assert await a.areadable_visits(ALICE) == {"a1"}

    asyncio.run(ask())


@pytest.mark.opa
def test_cache_window_and_membership_change(opa):
    a = OPAAuthority(opa.url, cache_seconds=1.5)
    try:
        assert a.may_access(ALICE, "read", "raw", "a1")
        opa.set_data("facility/sessions/a1/members", ["carol"])
        assert a.may_access(ALICE, "read", "raw", "a1"), "cached within the window"
        time.sleep(1.7)
        refused = a.may_access(ALICE, "read", "raw", "a1")
        assert not refused and "alice is neither a member of session a1" in refused.reason
    finally:
        opa.reset_data()


@pytest.mark.opa
def test_opa_down_fails_closed_and_is_not_cached(opa):
    a = OPAAuthority(opa.url, cache_seconds=60, timeout=1.0)
    try:
        opa.down()
        with pytest.raises(AuthorityUnavailable, match="cannot be reached"):
            a.may_run(ALICE, "saxs_average", "a1")
        opa.up()
        assert a.may_run(ALICE, "saxs_average", "a1")
    finally:
        opa.up()
    wrong = OPAAuthority(opa.url, package="no/such/policy", cache_seconds=0)
    with pytest.raises(AuthorityUnavailable, match="is the policy loaded"):
        wrong.may_run(ALICE, "saxs_average", "a1")
