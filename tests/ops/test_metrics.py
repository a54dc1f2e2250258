"""``/metrics`` of the real token service, Tiled and trigger: the counters move when the
thing they count happens (prometheus-client's exposition, as Prometheus scrapes it)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.fixtures.waiting import wait_until
from tests.ops.conftest import save, scrape, total
from visitflow.stack.services import free_port

pytestmark = pytest.mark.ops

GRANT_SCOPE = "run:saxs_average:a1 read:raw:a1/{run} write:processed:a1/{run}"


def test_token_service_counts_exchanges_refusals_opa_decisions_and_revocations(ops_idp, ops_token_service):
    url = f"{ops_token_service.issuer}/metrics"
    before = scrape(url)
    run = uuid.uuid4().hex
    alice = ops_idp.token("alice")
    ok = ops_token_service.exchange_response(alice, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=run))
    assert ok.status_code == 200, ok.text
    again = ops_token_service.exchange_response(alice, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=run))
    assert again.status_code == 200, again.text   # same question: from the decision cache
    bob = ops_idp.token("bob")
    refused = ops_token_service.exchange_response(bob, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=run))
    assert refused.status_code == 403 and refused.json()["error"] == "access_denied", refused.text
    assert ops_token_service.revoke(ok.json()["access_token"]).status_code == 200
    after = scrape(url)
    save("token-service.txt", url)

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("visitflow_token_requests_total", client="blueapi", grant="token_exchange", outcome="ok") == 2
    assert moved("visitflow_token_requests_total", client="blueapi", grant="token_exchange",
                 outcome="access_denied") == 1
    assert moved("visitflow_token_request_seconds_count", grant="token_exchange") == 3
    assert moved("visitflow_authority_queries_total", kind="opa", ok="true") >= 2   # alice's (3 scopes) and bob's
    assert moved("visitflow_authority_cache_total", hit="true") >= 3            # alice's second exchange
    assert moved("visitflow_authority_decision_seconds_count", kind="opa") >= 2
    assert moved("visitflow_token_revocations_total", kind="jti") == 1


def test_tiled_counts_gate_decisions_cache_hits_and_introspection(ops_idp, ops_tiled):
    url = f"{ops_tiled.uri}/metrics"
    before = scrape(url)
    token = ops_idp.token("alice")
    for _ in range(3):
        assert ops_tiled.get("metadata/", token=token).status_code == 200
    bad = ops_idp.sign(ops_idp.claims(aud="tiled", exp=1))   # expired
    assert ops_tiled.get("metadata/", token=bad).status_code == 401
    after = scrape(url)
    save("tiled.txt", url)

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("visitflow_tiled_token_decisions_total", outcome="accepted") == 1
    assert moved("visitflow_tiled_token_decisions_total", outcome="refused") == 1
    assert moved("visitflow_tiled_token_cache_total", hit="true") >= 2
    assert moved("visitflow_tiled_token_cache_total", hit="false") == 2
    assert moved("visitflow_tiled_introspection_seconds_count") == 1


def test_trigger_counts_outbox_depth_oldest_age_exchanges_and_refusals(tmp_path, ops_idp):
    """Prefect unreachable: the exchanged grant waits in the outbox (depth, age); a user
    without the run scope is refused by the IdP (refusals by reason)."""
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    port = free_port()
    holder = {"token": ops_idp.token("alice")}
    trig = AnalysisTrigger(TriggerSettings(issuer=ops_idp.issuer, prefect_api_url="http://127.0.0.1:9/api",
                                           client_secret="blueapi-dev-secret", state_dir=tmp_path / "trigger",
                                           max_backoff=1.0, metrics_port=port), token=lambda: holder["token"])
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        trig.request("saxs_average", "a1", "r-alice")
        wait_until(lambda: (trig.outbox.grant("saxs_average", "a1", "r-alice") or 0) and
                   trig.outbox.grant("saxs_average", "a1", "r-alice").state == "store", timeout=60,
                   what="alice's grant exchanged, waiting to be stored in Prefect")
        holder["token"] = ops_idp.token("carol")      # may read a1 but not start analyses there
        trig.request("saxs_average", "a1", "r-carol")
        wait_until(lambda: trig.outbox.grant("saxs_average", "a1", "r-carol").state == "refused", timeout=60,
                   what="carol's request refused")
        samples = scrape(url)
        save("trigger.txt", url)
        assert total(samples, "visitflow_trigger_outbox_depth", item="grant:store") == 1
        assert total(samples, "visitflow_trigger_outbox_depth", item="request:pending") == 1
        assert total(samples, "visitflow_trigger_outbox_oldest_seconds") > 0
        assert total(samples, "visitflow_trigger_exchange_seconds_count", outcome="ok") == 1
        assert total(samples, "visitflow_trigger_refusals_total", reason="invalid_scope") == 1
    finally:
        trig.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=2)     # closed with the trigger
