"""DataTokenSource against the real dev IdP: why an exchange was refused is decided by error
codes and the grant's own ``exp``, never by the IdP's wording (which differs per IdP)."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.idp_fixtures import SECRETS
from visitflow.flow.delegation import DataTokenSource, _expired
from visitflow.errors import DelegationError, DelegationExpired, GrantInvalid, NotAuthorised

RUN = "9f1c2d3e-aaaa-bbbb-cccc-000000000001"


def _source(idp, grant: str, run: str = RUN) -> DataTokenSource:
    return DataTokenSource(token_url=idp.token_url, grant=grant, client_id="visitflow",
                           client_secret=SECRETS["visitflow"], visit="a1", run_id=run)


def test_a_live_grant_gives_a_data_token(idp):
    grant, _ = idp.delegate(idp.token("alice"), "a1", RUN)
    token, expires_at = _source(idp, grant)()
    assert token and expires_at > time.time()


def test_an_expired_grant_is_delegation_expired(idp):
    now = int(time.time())
    grant = idp.sign(idp.claims(aud="visitflow", azp="blueapi", exp=now - 60, iat=now - 3600, nbf=now - 3600,
                                scope=f"run:saxs_average:a1 read:raw:a1/{RUN} write:processed:a1/{RUN}",
                                act={"sub": "blueapi"}))
    with pytest.raises(DelegationExpired) as info:
        _source(idp, grant)()
    assert info.value.code == "delegation_expired"


def test_a_grant_for_another_run_is_not_authorised(idp):
    grant, _ = idp.delegate(idp.token("alice"), "a1", "another-run")
    with pytest.raises(NotAuthorised) as info:
        _source(idp, grant)()   # asks for RUN's scopes: the IdP refuses to widen (invalid_scope)
    assert info.value.code == "not_authorised"


def test_a_forged_grant_is_invalid(idp):
    grant = idp.sign(idp.claims(aud="visitflow", scope=f"read:raw:a1/{RUN}"), key=idp.other_key)
    with pytest.raises(GrantInvalid) as info:
        _source(idp, grant)()
    assert isinstance(info.value, DelegationError) and info.value.code == "grant_invalid"


def test_expired_reads_only_exp():
    import jwt

    assert _expired(jwt.encode({"exp": 1}, "k" * 32, algorithm="HS256"))
    assert not _expired(jwt.encode({"exp": time.time() + 60}, "k" * 32, algorithm="HS256"))
    assert not _expired("not a jwt")
