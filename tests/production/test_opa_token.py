"""OPA run with ``--authentication=token --authorization=basic`` and the shipped
``deployments/opa/system_authz.rego``, asked by :class:`OPAAuthority` with its bearer token.

Real OPA (the pinned build, tests/fixtures/opa_fixtures.py), the tokens in OPA's environment
as a facility sets them.  What docs/production.md §9 recommends, shown to work: the reader's
token gets decisions, no token (or a wrong one) is refused with OPA's 401 as a reason —
never a silent allow — and only the admin token may write data.
"""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest

from tests.fixtures.opa_fixtures import start_opa
from visitflow.core.authority import OPAAuthority, Subject, authority_from_config
from visitflow.errors import AuthorityUnavailable, ConfigError

pytestmark = pytest.mark.opa

READER, ADMIN = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def opa_token(tmp_path_factory):
    handle = start_opa(tmp_path_factory.mktemp("opa-token"),
                       tokens={"VISITFLOW_OPA_TOKEN": READER, "VISITFLOW_OPA_ADMIN_TOKEN": ADMIN})
    yield handle
    handle.proxy.close()
    handle.service.stop()


ALICE, CAROL = Subject({"preferred_username": "alice"}), Subject({"preferred_username": "carol"})


def test_the_configured_token_gets_decisions_with_reasons(opa_token, monkeypatch):
    monkeypatch.setenv("VISITFLOW_TEST_OPA_TOKEN", READER)
    authority = authority_from_config({"kind": "opa", "url": opa_token.direct_url, "cache_seconds": 0,
                                       "token_env": "VISITFLOW_TEST_OPA_TOKEN"})
    assert authority.may_run(ALICE, "saxs_average", "a1").allow
    carol = authority.may_run(CAROL, "saxs_average", "a1")
    assert not carol.allow and "carol" in carol.reason
    assert authority.readable_visits(ALICE) == {"a1"}


def test_no_token_or_a_wrong_one_is_refused_with_a_reason(opa_token):
    for token in (None, "not-the-token", ADMIN[:-1]):
        authority = OPAAuthority(opa_token.direct_url, cache_seconds=0, token=token)
        with pytest.raises(AuthorityUnavailable, match="answered 401"):
            authority.may_run(ALICE, "saxs_average", "a1")


def test_the_async_path_sends_the_token_too(opa_token):
    """Tiled's policy asks through the async client (a separate httpx.AsyncClient)."""
    async def ask():
        good = OPAAuthority(opa_token.direct_url, cache_seconds=0, token=READER)
        return (await good.amay_access(ALICE, "read", "raw", "a1")).allow, await good.areadable_visits(ALICE)

    assert asyncio.run(ask()) == (True, {"a1"})
    with pytest.raises(AuthorityUnavailable, match="answered 401"):
        asyncio.run(OPAAuthority(opa_token.direct_url, cache_seconds=0).areadable_visits(ALICE))


def test_only_the_admin_token_writes_data_and_health_stays_open(opa_token):
    url = f"{opa_token.direct_url}/v1/data/facility/sessions/a1/members"
    assert httpx.get(f"{opa_token.direct_url}/health", timeout=10).status_code == 200
    assert httpx.put(url, json=["mallory"], timeout=10).status_code == 401
    reader = httpx.put(url, json=["mallory"], headers={"Authorization": f"Bearer {READER}"}, timeout=10)
    assert reader.status_code == 401, "the reader's token may ask the policy, not rewrite its data"
    policies = httpx.get(f"{opa_token.direct_url}/v1/policies", headers={"Authorization": f"Bearer {READER}"},
                         timeout=10)
    assert policies.status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    members = httpx.get(url, headers=admin, timeout=10).json()["result"]
    assert httpx.put(url, json=[*members, "bob"], headers=admin, timeout=10).status_code == 204
    try:
        assert OPAAuthority(opa_token.direct_url, cache_seconds=0, token=READER).may_run(
            Subject({"preferred_username": "bob"}), "saxs_average", "a1").allow is False, "bob is no analyst"
        assert OPAAuthority(opa_token.direct_url, cache_seconds=0, token=READER).readable_visits(
            Subject({"preferred_username": "bob"})) == {"a1", "a2"}
    finally:
        httpx.put(url, json=members, headers=admin, timeout=10)


def test_an_unset_token_variable_is_refused_before_any_query(monkeypatch):
    monkeypatch.delenv("VISITFLOW_TEST_OPA_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="VISITFLOW_TEST_OPA_TOKEN"):
        authority_from_config({"kind": "opa", "url": "http://127.0.0.1:1", "token_env": "VISITFLOW_TEST_OPA_TOKEN"})
