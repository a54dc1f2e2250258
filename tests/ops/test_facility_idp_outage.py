"""The facility IdP down before the token service has its keys: the exchange is a 503
``temporarily_unavailable`` with the reason, not a 401 (visitflow/token_service/federation.py
``subject_refused``).  Why it matters: the trigger retries a 5xx while the user's token lives
and then records Failed runs carrying the recovery command (visitflow/trigger/outage.py); a 401
is a final refusal that leaves nothing to recover.  Real dev IdP as the facility IdP (stopped),
real token services, real OPA."""

from __future__ import annotations

import pytest

from tests.fixtures.federation_fixtures import start_token_service
from tests.fixtures.idp_fixtures import start_idp
from tests.ops.test_metrics import GRANT_SCOPE

pytestmark = pytest.mark.ops


def test_facility_idp_down_before_its_keys_are_cached_is_503_with_the_reason(tmp_path, ops_opa):
    facility = start_idp(tmp_path / "facility")
    cold = warm = None
    try:
        alice = facility.token("alice")
        cold = start_token_service(tmp_path / "cold", facility.issuer, ops_opa.url)
        warm = start_token_service(tmp_path / "warm", facility.issuer, ops_opa.url)
        scope = GRANT_SCOPE.format(run="u-outage")
        ok = warm.exchange_response(alice, "blueapi", audience="visitflow", scope=scope)
        assert ok.status_code == 200, ok.text      # warm has fetched the facility IdP's keys
        facility.service.stop()

        down = cold.exchange_response(alice, "blueapi", audience="visitflow", scope=scope)
        assert down.status_code == 503, down.text
        body = down.json()
        assert body["error"] == "temporarily_unavailable", body
        assert f"cannot verify tokens of {facility.issuer} now" in body["error_description"], body
        assert down.headers.get("retry-after") == "5"

        garbage = cold.exchange_response("not-a-jwt", "blueapi", audience="visitflow", scope=scope)
        assert garbage.status_code == 401 and garbage.json()["error"] == "invalid_token", garbage.text

        cached = warm.exchange_response(alice, "blueapi", audience="visitflow", scope=scope)
        assert cached.status_code == 200, cached.text   # keys cached: the outage costs nothing
    finally:
        for ts in (cold, warm):
            if ts is not None:
                ts.service.stop()
        facility.service.stop()
