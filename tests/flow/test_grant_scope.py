"""``grant_scope="visit"``: delegation with an IdP whose scopes are a fixed list (Keycloak).

Keycloak grants only scopes that exist as client scopes and *refuses* an exchange asking for
any other (``invalid_scope``; observed on 26.7.3, tests/token_service/test_keycloak.py), so per-run scopes
(``read:raw:a1/<run>``) cannot be had.  A dev IdP started with ``fixed_scopes: true``
applies Keycloak's rules at the token exchange (tests/token_service/test_keycloak_parity.py); against it:

* the design's per-run request is refused at the trigger's exchange, and a Block left in
  run mode is refused its data token with the fix named, *before any data access*;
* ``grant_scope="visit"`` works end to end: trigger-side exchange, Block (``for_run``, with
  the grant stored in a real Prefect Secret), Tiled reads and writes — and the trade-off is
  asserted, not hidden: the data token can read the visit's other runs, never another visit.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.idp_fixtures import start_fixed_scopes_idp
from tests.fixtures.scans import run_scan
from tests.fixtures.tiled_fixtures import running_tiled
from visitflow.core import names as grants
from visitflow.flow.delegation import DataTokenSource, check_grant
from visitflow.errors import NotAuthorised, ScopeError
from visitflow.core.oauth import token_endpoint
from visitflow.core.scopes import ScopeSet, data_token_scopes, grant_scopes
from visitflow.core.tiled_client import BearerAuth, processed_client, raw_client
from visitflow.core.tokens import TokenValidator, unverified_claims

CLIENT_SECRET = "visitflow-dev-secret"


# ------------------------------------------------------------------ pure logic
def test_visit_mode_scopes():
    assert grant_scopes("saxs_average", "a1", "r1", "visit") == ScopeSet.parse(
        "run:saxs_average:a1 read:data:a1 write:data:a1")
    assert data_token_scopes("a1", "r1", "visit") == ScopeSet.parse("read:data:a1 write:data:a1")
    assert data_token_scopes("a1", "r1") == ScopeSet.parse("read:raw:a1/r1 write:processed:a1/r1")
    # a visit-wide grant covers everything a run needs, so the Block's check is the same in both modes
    assert grant_scopes("saxs_average", "a1", "r1", "visit").uncovered(grant_scopes("saxs_average", "a1", "r1")) == []
    with pytest.raises(ScopeError):
        grant_scopes("saxs_average", "a1", "r1", "beamline")


# ------------------------------------------------------------------ real servers
@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    idp = start_fixed_scopes_idp(tmp_path_factory.mktemp("fixed-idp"))
    try:
        with running_tiled(idp, tmp_path_factory.mktemp("fixed-tiled")) as tiled:
            yield idp, tiled
    finally:
        idp.service.stop()


def scope_of(token: str) -> ScopeSet:
    return ScopeSet.parse(unverified_claims(token).get("scope", ""))


def test_per_run_request_is_refused_and_a_narrower_grant_fails_the_block_check(fixed):
    idp, tiled = fixed
    uid = run_scan(tiled.uri, idp.token("alice"), num=3)
    r = idp.exchange_response(idp.token("alice"), "blueapi", audience="visitflow",
                              scope=str(grant_scopes("saxs_average", "a1", uid)))
    assert r.json()["error"] == "invalid_scope", "refused, as Keycloak does"
    # a grant that lacks the data scopes (a scope the user lacks is dropped, not refused)
    grant = idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                         scope="run:saxs_average:a1 read:data:a2")["access_token"]
    assert scope_of(grant) == ScopeSet.parse("run:saxs_average:a1")
    with pytest.raises(NotAuthorised, match=f"read:raw:a1/{uid}"):
        check_grant(TokenValidator(idp.issuer, "visitflow"), grant, "saxs_average", "a1", uid)


def test_visit_grant_end_to_end_through_the_block(fixed, prefect_stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visitflow.flow.credentials import ScopedCredentials

    idp, tiled = fixed
    alice = idp.token("alice")
    uid = run_scan(tiled.uri, alice, num=5, seed=1)
    other = run_scan(tiled.uri, alice, num=2, seed=2)
    grant = idp.exchange(alice, "blueapi", audience="visitflow",
                         scope=str(grant_scopes("saxs_average", "a1", uid, "visit")))["access_token"]
    assert scope_of(grant) == grant_scopes("saxs_average", "a1", uid, "visit")
    prefect_stack.api.save_secret(grants.grant_secret_name("saxs_average", "a1", uid), grant)
    block = ScopedCredentials(issuer=idp.issuer, client_secret=CLIENT_SECRET, raw_uri=tiled.uri,
                              grant_scope="visit")
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack.api_url}):
        access = block.for_run("a1", uid, "saxs_average")
    assert access.tokens.per == "visit"
    assert scope_of(access.tokens()[0]) == ScopeSet.parse("read:data:a1 write:data:a1")
    assert access.token_identity()["token_scope"]
    assert access.raw_run()["primary"]["saxs"].shape[0] == 5
    out = access.processed_run()
    ensured = out.create_container(key="saxs_average", metadata={})
    ensured.write_array(np.arange(4.0), key="average")
    np.testing.assert_array_equal(out["saxs_average"]["average"].read(), np.arange(4.0))
    # the trade-off of grant_scope=visit, stated as a test: other runs of the visit are readable ...
    data = access.tokens()[0]
    assert tiled.get(f"metadata/raw/a1/{other}", data).status_code == 200
    # ... another visit is not, and a2's processed data cannot be written
    assert tiled.get("metadata/raw/a2", data).status_code in (403, 404)
    r = tiled.request("POST", "metadata/processed/a2", data,
                      json={"structure_family": "container", "metadata": {}, "specs": [], "data_sources": [],
                            "id": "sneaky"})
    assert r.status_code in (401, 403, 404), r.text


def test_run_mode_block_against_a_fixed_scope_idp_fails_before_data(fixed, prefect_stack):
    """The default mode with Keycloak's rule: a clear NotAuthorised, not a 500 or a 403 later."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visitflow.flow.credentials import ScopedCredentials

    idp, tiled = fixed
    uid = run_scan(tiled.uri, idp.token("alice"), num=2, seed=3)
    grant = idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                         scope=str(grant_scopes("saxs_average", "a1", uid, "visit")))["access_token"]
    # a visit grant passes the check, but the IdP refuses the per-run scopes of the data token:
    # refused at the exchange, with the fix named, before any read
    source = DataTokenSource(token_endpoint(idp.issuer), grant, "visitflow", CLIENT_SECRET, "a1", uid)
    with pytest.raises(NotAuthorised, match="cannot issue per-run scopes; set grant_scope='visit'"):
        source()
    # the whole Block in run mode with that visit grant: the same refusal, before any data access
    prefect_stack.api.save_secret(grants.grant_secret_name("peak_stats", "a1", uid),
                                  idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                                               scope=str(grant_scopes("peak_stats", "a1", uid, "visit")))["access_token"])
    block = ScopedCredentials(issuer=idp.issuer, client_secret=CLIENT_SECRET, raw_uri=tiled.uri)
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack.api_url}), \
            pytest.raises(NotAuthorised, match="cannot issue per-run scopes|does not cover"):
        block.for_run("a1", uid, "peak_stats")
