"""PrefectAPI's retry, backoff, refusal and outage logic on an ``httpx.MockTransport`` (no
server; the backoff is recorded, not waited).  The real-server behaviour is covered by the
trigger and e2e suites; these pin what the client itself decides."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.fixtures.scripted_http import ScriptedServer, SleepRecorder, refused_connection
from visitflow.core import names
from visitflow.core.prefect_api import RETRY_STATUS, PrefectAPI
from visitflow.errors import PrefectRefused, PrefectUnavailable

API = "http://prefect.test/api"
RUN = {"id": "run-1", "name": "peak-stats/post a1 r1", "state": {"type": "SCHEDULED"}}
SECRET_TYPE = {"id": "type-1", "slug": "secret"}
SECRET_SCHEMA = {"id": "schema-1"}


def client(server: ScriptedServer, **kw) -> tuple[PrefectAPI, SleepRecorder]:
    sleep = SleepRecorder()
    return PrefectAPI(API, transport=server.transport, sleep=sleep, **kw), sleep


def busy(status: int = 503) -> httpx.Response:
    return httpx.Response(status, json={"detail": "database is locked"})


# ------------------------------------------------------------------ retry and backoff
def test_a_busy_server_is_retried_with_doubling_backoff_until_it_answers():
    server = ScriptedServer().on("GET", "/api/flow_runs/run-1", busy(503), busy(429), busy(502), busy(504),
                                 httpx.Response(200, json=RUN))
    api, sleep = client(server)
    assert api.flow_run("run-1") == RUN
    assert server.calls() == [("GET", "/api/flow_runs/run-1")] * 5
    assert len(sleep.waits) == 4
    for i, wait in enumerate(sleep.waits):   # backoff 0.25 doubling, plus up to 50 % jitter
        assert 0.25 * 2 ** i <= wait <= 1.5 * 0.25 * 2 ** i, sleep.waits


def test_a_server_that_stays_busy_is_unavailable_after_the_budget_and_the_backoff_is_capped():
    server = ScriptedServer().on("GET", "/api/flow_runs/run-1", busy(503))
    api, sleep = client(server, attempts=9)
    with pytest.raises(PrefectUnavailable, match="GET /flow_runs/run-1: HTTP 503"):
        api.flow_run("run-1")
    assert len(server.requests) == 9
    assert len(sleep.waits) == 8, "no wait after the last attempt"
    assert all(5.0 <= w <= 7.5 for w in sleep.waits[5:]), f"capped at 5 s (+jitter): {sleep.waits}"


def test_a_refused_connection_is_unavailable_after_the_retry_budget():
    server = ScriptedServer().on("POST", "/api/flow_runs/filter", refused_connection)
    api, sleep = client(server, attempts=3)
    with pytest.raises(PrefectUnavailable, match="ConnectError") as info:
        api.flow_runs(tags=["run:r1"])
    assert not isinstance(info.value, PrefectRefused)
    assert server.calls() == [("POST", "/api/flow_runs/filter")] * 3 and len(sleep.waits) == 2


def test_a_connection_lost_once_then_back_is_invisible_to_the_caller():
    server = ScriptedServer().on("POST", "/api/flow_runs/filter", refused_connection,
                                 httpx.Response(200, json=[RUN]))
    api, _ = client(server)
    assert api.flow_runs(tags=["run:r1"], limit=5) == [RUN]
    (first, second) = server.bodies("POST", "/api/flow_runs/filter")
    assert first == second == {"limit": 5, "sort": "EXPECTED_START_TIME_ASC", "flow_runs": {"tags": {"all_": ["run:r1"]}}}


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500])
def test_a_refusal_is_final_at_once_and_carries_the_servers_reason(status):
    assert status not in RETRY_STATUS
    reason = "Validation error for parameter 'background': value is not a valid float"
    server = ScriptedServer().on("GET", "/api/deployments/name/peak-stats/post",
                                 httpx.Response(status, json={"detail": reason}))
    api, sleep = client(server)
    with pytest.raises(PrefectRefused) as info:
        api.deployment("peak-stats/post")
    assert info.value.status == status
    assert reason in str(info.value) and f"HTTP {status}" in str(info.value)
    assert len(server.requests) == 1 and sleep.waits == [], "a refusal is not retried"


def test_a_refusal_reason_is_cut_short():
    server = ScriptedServer().on("GET", "/api/flow_runs/x", httpx.Response(400, text="x" * 5000))
    api, _ = client(server)
    with pytest.raises(PrefectRefused) as info:
        api.flow_run("x")
    assert len(str(info.value)) < 400


def test_basic_auth_is_sent_on_every_attempt():
    server = ScriptedServer().on("GET", "/api/flow_runs/run-1", busy(), httpx.Response(200, json=RUN))
    api, _ = client(server, auth_string="admin:pass")
    api.flow_run("run-1")
    want = "Basic " + base64.b64encode(b"admin:pass").decode()
    assert [r.headers.get("authorization") for r in server.requests] == [want, want]


def test_health_asks_once_and_says_false_when_unreachable():
    up = ScriptedServer().on("GET", "/api/health", httpx.Response(200, json=True))
    down = ScriptedServer().on("GET", "/api/health", refused_connection)
    assert client(up)[0].health() is True
    assert client(down)[0].health() is False
    assert len(down.requests) == 1, "health is a probe: no retries"


# ------------------------------------------------------------------ secrets
def secret_server() -> ScriptedServer:
    return (ScriptedServer()
            .on("GET", "/api/block_types/slug/secret", httpx.Response(200, json=SECRET_TYPE))
            .on("POST", "/api/block_schemas/filter", httpx.Response(200, json=[SECRET_SCHEMA])))


def test_save_secret_creates_then_overwrites_and_looks_the_type_up_once():
    name = "visitflow-grant-x"
    doc_path = f"/api/block_types/slug/secret/block_documents/name/{name}"
    server = secret_server().on("GET", doc_path, httpx.Response(404, json={"detail": "Block document not found"}),
                                httpx.Response(200, json={"id": "doc-1"}))
    server.on("POST", "/api/block_documents/", httpx.Response(201, json={"id": "doc-1"}))
    server.on("PATCH", "/api/block_documents/doc-1", httpx.Response(204))
    api, _ = client(server)
    assert api.save_secret(name, "grant-1") == "doc-1"
    assert server.bodies("POST", "/api/block_documents/") == [
        {"name": name, "block_type_id": "type-1", "block_schema_id": "schema-1", "data": {"value": "grant-1"}}]
    assert api.save_secret(name, "grant-2") == "doc-1"
    assert server.bodies("PATCH", "/api/block_documents/doc-1") == [
        {"data": {"value": "grant-2"}, "merge_existing_data": False}]
    assert len(server.calls("GET", "/api/block_types/slug/secret")) == 1, "type and schema ids are cached"
    assert server.bodies("POST", "/api/block_schemas/filter") == [
        {"block_schemas": {"block_type_id": {"any_": ["type-1"]}}, "limit": 1}]


def test_save_secret_that_loses_a_race_overwrites_the_winner():
    name = "visitflow-grant-x"
    doc_path = f"/api/block_types/slug/secret/block_documents/name/{name}"
    server = secret_server().on("GET", doc_path, httpx.Response(404), httpx.Response(200, json={"id": "theirs"}))
    server.on("POST", "/api/block_documents/", httpx.Response(409, json={"detail": "Block already exists"}))
    server.on("PATCH", "/api/block_documents/theirs", httpx.Response(204))
    api, _ = client(server)
    assert api.save_secret(name, "mine") == "theirs"
    assert server.bodies("PATCH", "/api/block_documents/theirs") == [
        {"data": {"value": "mine"}, "merge_existing_data": False}]


def test_save_secret_gives_up_on_a_server_that_keeps_answering_409_for_a_name_it_cannot_find():
    """It used to recurse until RecursionError; now one retry, then Prefect's refusal."""
    name = "visitflow-grant-x"
    server = secret_server().on("GET", f"/api/block_types/slug/secret/block_documents/name/{name}",
                                httpx.Response(404))
    server.on("POST", "/api/block_documents/", httpx.Response(409, json={"detail": "Block already exists"}))
    api, _ = client(server)
    with pytest.raises(PrefectRefused, match="Block already exists") as info:
        api.save_secret(name, "mine")
    assert info.value.status == 409
    assert len(server.calls("POST", "/api/block_documents/")) == 2


def test_a_server_without_the_secret_block_schema_is_refused():
    server = secret_server().on("POST", "/api/block_schemas/filter", httpx.Response(200, json=[]))
    api, _ = client(server)
    with pytest.raises(PrefectRefused, match="Secret block schema is not registered") as info:
        api.save_secret("visitflow-grant-x", "v")
    assert info.value.status == 404 and server.calls("POST", "/api/block_documents/") == []


def test_delete_secret_of_a_missing_secret_is_false_and_deletes_nothing():
    server = ScriptedServer().on("GET", "/api/block_types/slug/secret/block_documents/name/gone",
                                 httpx.Response(404))
    api, _ = client(server)
    assert api.delete_secret("gone") is False
    assert server.calls("DELETE") == []


def test_delete_secret_deletes_the_document_found():
    server = ScriptedServer().on("GET", "/api/block_types/slug/secret/block_documents/name/g",
                                 httpx.Response(200, json={"id": "doc-9"}))
    server.on("DELETE", "/api/block_documents/doc-9", httpx.Response(204))
    api, _ = client(server)
    assert api.delete_secret("g") is True
    assert server.calls("DELETE") == [("DELETE", "/api/block_documents/doc-9")]


# ------------------------------------------------------------------ idempotent creates
@pytest.mark.parametrize("ensure, create_path, patch_path, patch_body", [
    (lambda api: api.ensure_concurrency_limit("visitflow-live-a1", 3), "/api/v2/concurrency_limits/",
     "/api/v2/concurrency_limits/visitflow-live-a1", {"limit": 3}),
    (lambda api: api.ensure_work_queue("pool", "q1", 2), "/api/work_pools/pool/queues/",
     "/api/work_pools/pool/queues/q1", {"concurrency_limit": 2}),
])
def test_ensure_creates_or_on_409_resizes(ensure, create_path, patch_path, patch_body):
    fresh = ScriptedServer().on("POST", create_path, httpx.Response(201, json={"id": "x"}))
    ensure(client(fresh)[0])
    assert fresh.calls() == [("POST", create_path)]
    exists = ScriptedServer().on("POST", create_path, httpx.Response(409, json={"detail": "exists"}))
    exists.on("PATCH", patch_path, httpx.Response(204))
    ensure(client(exists)[0])
    assert exists.calls() == [("POST", create_path), ("PATCH", patch_path)]
    assert exists.bodies("PATCH", patch_path) == [patch_body]
    forbidden = ScriptedServer().on("POST", create_path, httpx.Response(403, json={"detail": "no"}))
    with pytest.raises(PrefectRefused) as info:
        ensure(client(forbidden)[0])
    assert info.value.status == 403 and forbidden.calls("PATCH") == []


def test_a_retried_create_flow_run_sends_the_same_idempotency_key_so_prefect_makes_one_run():
    """A 503 may come after Prefect committed the run: the retry must be the same request."""
    dep = names.deployment_name("peak_stats", "post")
    server = ScriptedServer().on("GET", f"/api/deployments/name/{dep}", httpx.Response(200, json={"id": "dep-1"}))
    server.on("POST", "/api/deployments/dep-1/create_flow_run", busy(503), refused_connection,
              httpx.Response(201, json=RUN))
    api, _ = client(server)
    assert api.create_analysis_run("peak_stats", "post", "a1", "r1", {"background": 1.5}) == RUN
    bodies = server.bodies("POST", "/api/deployments/dep-1/create_flow_run")
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    body = bodies[0]
    assert body["idempotency_key"] == names.idempotency_key("peak_stats", "post", "a1", "r1", {"background": 1.5})
    assert body["parameters"] == {"visit": "a1", "run_id": "r1", "background": 1.5}
    assert body["tags"] == names.run_tags("peak_stats", "a1", "r1", "post")
    assert body["name"] == names.flow_run_name("peak_stats", "post", "a1", "r1") and "state" not in body
    # the deployment id is looked up once
    api.create_analysis_run("peak_stats", "post", "a1", "r2")
    assert len(server.calls("GET", f"/api/deployments/name/{dep}")) == 1


def test_a_failed_record_is_created_in_the_state_given():
    server = ScriptedServer().on("GET", "/api/deployments/name/peak-stats/live", httpx.Response(200, json={"id": "d"}))
    server.on("POST", "/api/deployments/d/create_flow_run", httpx.Response(201, json=RUN))
    api, _ = client(server)
    state = {"type": "FAILED", "name": "Failed", "message": "no grant"}
    api.create_flow_run("peak-stats/live", {"visit": "a1", "run_id": "r1"}, idempotency_key="k", state=state)
    (body,) = server.bodies("POST", "/api/deployments/d/create_flow_run")
    assert body == {"parameters": {"visit": "a1", "run_id": "r1"}, "idempotency_key": "k", "tags": [], "state": state}


def test_parameter_schema_of_a_deployment_without_one_is_empty():
    server = ScriptedServer().on("GET", "/api/deployments/name/a/b", httpx.Response(200, json={"id": "d"}))
    assert client(server)[0].deployment_parameter_schema("a/b") == {}


def test_wait_for_flow_run_polls_until_a_final_state():
    states = [{"type": "PENDING"}, {"type": "RUNNING"}, {"type": "COMPLETED"}]
    server = ScriptedServer().on("GET", "/api/flow_runs/run-1",
                                 *[httpx.Response(200, json={**RUN, "state": s}) for s in states])
    api, sleep = client(server)
    assert api.wait_for_flow_run("run-1", interval=0.5)["state"]["type"] == "COMPLETED"
    assert len(server.requests) == 3 and sleep.waits == [0.5, 0.5]
