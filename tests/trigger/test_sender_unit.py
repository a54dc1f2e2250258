"""The trigger's send path (exchange at the IdP, grant stored as a Prefect Secret, flow runs
created or failures recorded) on an ``httpx.MockTransport``: small stateful fakes of the IdP
and Prefect, no server, no waiting (``max_backoff=0`` makes every retry due at once; the
Prefect client's backoff is recorded, not slept).  tests/trigger/test_trigger.py and
test_trigger_outage.py do the same against the real IdP, Prefect and a RunEngine."""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest

from tests.fixtures.scripted_http import ScriptedServer, SleepRecorder, refused_connection
from visitflow.core import names
from visitflow.core.scopes import grant_scopes
from visitflow.trigger import AnalysisTrigger, TriggerSettings

ISSUER = "http://idp.test"
PREFECT = "http://prefect.test/api"
SECRET = "blueapi-dev-secret"
ANALYSES = ("saxs_average", "peak_stats")
DOC_PREFIX = "/api/block_types/slug/secret/block_documents/name/"


class FakeIdP:
    """Discovery and an RFC 8693 token endpoint; ``down`` is an answer to give instead."""

    def __init__(self):
        self.down = None
        self.refuse = None      # an RFC 6749 error body
        self.issued = 0

    def __call__(self, request: httpx.Request):
        if self.down is not None:
            return self.down
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISSUER, "token_endpoint": f"{ISSUER}/token"})
        if self.refuse is not None:
            return httpx.Response(400, json=self.refuse)
        self.issued += 1
        return httpx.Response(200, json={"access_token": f"T-grant-{self.issued}", "expires_in": 300})


class FakePrefect:
    """The five Prefect endpoints the trigger uses, with Prefect's idempotency-key rule (the
    same key returns the run it made).  ``down`` is an answer to give instead; ``refuse``
    maps a deployment to the answer its create_flow_run gives."""

    def __init__(self, schema: dict | None = None):
        self.down = None
        self.refuse: dict[str, httpx.Response] = {}
        self.secrets: dict[str, str] = {}
        self.runs: dict[str, dict] = {}     # idempotency key -> flow run
        self.schema = schema or {}

    def __call__(self, request: httpx.Request):
        if self.down is not None:
            return self.down
        path, method = request.url.path, request.method
        if (method, path) == ("GET", "/api/block_types/slug/secret"):
            return httpx.Response(200, json={"id": "secret-type"})
        if (method, path) == ("POST", "/api/block_schemas/filter"):
            return httpx.Response(200, json=[{"id": "secret-schema"}])
        if method == "GET" and path.startswith(DOC_PREFIX):
            name = path[len(DOC_PREFIX):]
            if name not in self.secrets:
                return httpx.Response(404, json={"detail": "Block document not found"})
            return httpx.Response(200, json={"id": f"doc-{name}"})
        if (method, path) == ("POST", "/api/block_documents/"):
            body = json.loads(request.content)
            self.secrets[body["name"]] = body["data"]["value"]
            return httpx.Response(201, json={"id": f"doc-{body['name']}"})
        if method == "GET" and path.startswith("/api/deployments/name/"):
            name = path[len("/api/deployments/name/"):]
            return httpx.Response(200, json={"id": name.replace("/", "--"), "parameter_openapi_schema": self.schema})
        if method == "POST" and path.endswith("/create_flow_run"):
            deployment = path.split("/")[3].replace("--", "/")
            if deployment in self.refuse:
                return self.refuse[deployment]
            body = json.loads(request.content)
            run = self.runs.setdefault(body["idempotency_key"], {
                "id": f"run-{len(self.runs) + 1}", "name": body.get("name"), "deployment": deployment,
                "parameters": body["parameters"], "tags": body["tags"], "state": body.get("state")})
            return httpx.Response(201, json=run)
        return httpx.Response(404, json={"detail": f"not faked: {method} {path}"})


class World:
    """The IdP and Prefect behind one MockTransport (their paths do not overlap)."""

    def __init__(self, schema: dict | None = None):
        self.idp, self.prefect = FakeIdP(), FakePrefect(schema)
        self.server = ScriptedServer(fallback=self._route)
        self.sleep = SleepRecorder()

    def _route(self, request: httpx.Request):
        return (self.prefect if request.url.host == "prefect.test" else self.idp)(request)

    def trigger(self, tmp_path, token="T-alice", **kw) -> AnalysisTrigger:
        settings = TriggerSettings(issuer=ISSUER, prefect_api_url=PREFECT, client_secret=SECRET,
                                   state_dir=tmp_path / "trigger", max_backoff=0.0, **kw)
        return AnalysisTrigger(settings, token=token, start_sender=False, transport=self.server.transport,
                               sleep=self.sleep)

    def creates(self) -> list[dict]:
        return [json.loads(r.content) for r in self.server.requests
                if r.method == "POST" and r.url.path.endswith("/create_flow_run")]

    def token_requests(self) -> list[httpx.Request]:
        return [r for r in self.server.requests if r.url.host == "idp.test" and r.url.path == "/token"]


def send(trig: AnalysisTrigger) -> None:
    with trig.prefect_api() as api:
        trig.send_once(api)


def scan(trig: AnalysisTrigger, uid="u1", analyses=ANALYSES, **start) -> None:
    trig("start", {"uid": uid, "analyses": list(analyses), "instrument_session": "a1", **start})
    trig("stop", {"run_start": uid, "exit_status": "success"})


def keys(uid="u1", analyses=ANALYSES) -> set[str]:
    return {names.idempotency_key(a, v, "a1", uid) for a in analyses for v in ("live", "post")}


def unsigned(exp: float) -> str:
    return jwt.encode({"sub": "alice", "exp": int(exp)}, "k" * 32, algorithm="HS256")


# ------------------------------------------------------------------ the path that works
def test_one_pass_delegates_stores_and_creates_each_run_once(tmp_path):
    world = World()
    trig = world.trigger(tmp_path)
    scan(trig)
    send(trig)
    assert {(r.key, r.state) for r in trig.outbox.requests()} == {(k, "done") for k in keys()}
    assert trig.outbox.pending_count() == 0 and not trig.holds_token_for("u1")
    # the exchange: the user's token for the run's grant scopes, as the blueapi client
    forms = [dict(httpx.QueryParams(r.content.decode())) for r in world.token_requests()]
    assert sorted(f["scope"] for f in forms) == sorted(str(grant_scopes(a, "a1", "u1")) for a in ANALYSES)
    assert all(f["subject_token"] == "T-alice" and f["audience"] == "visitflow" for f in forms)
    assert all(r.headers["authorization"].startswith("Basic ") for r in world.token_requests())
    # each grant stored under its name; the outbox forgets it once stored
    assert set(world.prefect.secrets) == {names.grant_secret_name(a, "a1", "u1") for a in ANALYSES}
    assert set(world.prefect.secrets.values()) == {"T-grant-1", "T-grant-2"}
    assert all(trig.outbox.grant(a, "a1", "u1").token is None for a in ANALYSES)
    creates = world.creates()
    assert len(creates) == 4 and {c["idempotency_key"] for c in creates} == keys()
    assert all(c["parameters"] == {"visit": "a1", "run_id": "u1"} and "state" not in c for c in creates)
    assert "T-grant" not in json.dumps(creates) and "T-alice" not in json.dumps(creates)
    # nothing is due any more: another pass sends nothing
    sent = len(world.server.requests)
    send(trig)
    assert len(world.server.requests) == sent and world.sleep.waits == []
    trig.close()


def test_the_sender_thread_uses_the_transport(tmp_path):
    world = World()
    settings = TriggerSettings(issuer=ISSUER, prefect_api_url=PREFECT, client_secret=SECRET,
                               state_dir=tmp_path / "trigger", max_backoff=0.0)
    trig = AnalysisTrigger(settings, token="T-alice", transport=world.server.transport, sleep=world.sleep)
    try:
        scan(trig, analyses=("peak_stats",))
        assert trig.flush(30), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
        assert {r.state for r in trig.outbox.requests()} == {"done"}
    finally:
        trig.close()
    assert not trig._sender.is_alive()
    assert {c["idempotency_key"] for c in world.creates()} == keys(analyses=("peak_stats",))


# ------------------------------------------------------------------ Prefect
@pytest.mark.parametrize("outage", [httpx.Response(503, json={"detail": "database is locked"}),
                                    httpx.Response(429), refused_connection],
                         ids=["503", "429", "connection-refused"])
def test_prefect_down_then_back_loses_nothing_and_duplicates_nothing(tmp_path, outage):
    world = World()
    world.prefect.down = outage
    trig = world.trigger(tmp_path)
    scan(trig)
    send(trig)
    for a in ANALYSES:   # exchanged while Prefect was down: the grant waits in the outbox
        g = trig.outbox.grant(a, "a1", "u1")
        assert g.state == "store" and g.token and g.attempts == 1, g
    assert not trig.holds_token_for("u1"), "the user's token is not kept for Prefect's sake"
    assert {r.state for r in trig.outbox.requests()} == {"pending"} and world.creates() == []
    assert len(world.sleep.waits) == 2, "each Secret store tried twice, with one backoff between"
    send(trig)   # still down: retried, still nothing lost
    assert all(trig.outbox.grant(a, "a1", "u1").attempts == 2 for a in ANALYSES)
    world.prefect.down = None
    send(trig)
    assert {(r.key, r.state) for r in trig.outbox.requests()} == {(k, "done") for k in keys()}
    assert len(world.creates()) == 4 and len(world.prefect.runs) == 4
    assert set(world.prefect.secrets.values()) == {"T-grant-1", "T-grant-2"}, "exchanged once, not again"
    assert len(world.token_requests()) == 2
    trig.close()


def test_prefect_down_after_the_secrets_are_stored_retries_the_creates_with_the_same_keys(tmp_path):
    world = World()
    trig = world.trigger(tmp_path)
    scan(trig)
    dep = names.deployment_name("peak_stats", "post")
    world.prefect.refuse[dep] = httpx.Response(502)
    send(trig)
    (r,) = [r for r in trig.outbox.requests() if r.variant == "post" and r.analysis == "peak_stats"]
    assert r.state == "pending" and r.attempts == 1 and "HTTP 502" in r.error
    del world.prefect.refuse[dep]
    send(trig)
    assert {r.state for r in trig.outbox.requests()} == {"done"}
    key = names.idempotency_key("peak_stats", "post", "a1", "u1")
    assert [c["idempotency_key"] for c in world.creates()].count(key) == 3   # two tries, then the retry
    assert len(world.prefect.runs) == 4
    trig.close()


def test_a_prefect_refusal_is_recorded_and_final(tmp_path):
    world = World()
    reason = "Validation error: parameter run_id is required"
    dep = names.deployment_name("saxs_average", "post")
    world.prefect.refuse[dep] = httpx.Response(422, json={"detail": reason})
    trig = world.trigger(tmp_path)
    scan(trig)
    send(trig)
    key = names.idempotency_key("saxs_average", "post", "a1", "u1")
    states = {r.key: r for r in trig.outbox.requests()}
    assert states[key].state == "failed" and reason in states[key].error and "HTTP 422" in states[key].error
    assert {r.state for k, r in states.items() if k != key} == {"done"}
    assert any(d.startswith(f"Prefect refused {key}") and reason in d and "will retry" not in d
               for d in trig.decisions), trig.decisions
    assert trig.outbox.pending_count() == 0
    tries = len(world.creates())
    del world.prefect.refuse[dep]
    send(trig)
    assert len(world.creates()) == tries, "a final refusal is not retried"
    trig.close()


def test_a_prefect_refusal_that_may_pass_is_retried(tmp_path):
    world = World()
    dep = names.deployment_name("peak_stats", "live")
    world.prefect.refuse[dep] = httpx.Response(403, json={"detail": "work pool paused"})
    trig = world.trigger(tmp_path, live=True)
    scan(trig, analyses=("peak_stats",))
    send(trig)
    key = names.idempotency_key("peak_stats", "live", "a1", "u1")
    r = {r.key: r for r in trig.outbox.requests()}[key]
    assert r.state == "pending" and r.attempts == 1 and "work pool paused" in r.error
    assert any(d.startswith(f"Prefect refused {key}") and d.endswith("(will retry)") for d in trig.decisions)
    del world.prefect.refuse[dep]
    send(trig)
    assert {r.state for r in trig.outbox.requests()} == {"done"}
    trig.close()


# ------------------------------------------------------------------ the IdP
@pytest.mark.parametrize("outage", [refused_connection, httpx.Response(503),
                                    httpx.Response(200, json={"token_type": "Bearer"})],
                         ids=["connection-refused", "503", "200-without-a-token"])
def test_idp_outage_then_recovery(tmp_path, outage):
    world = World()
    trig = world.trigger(tmp_path)
    if isinstance(outage, httpx.Response):   # discovery works, the token endpoint does not
        world.server.on("POST", "/token", outage)
    else:
        world.idp.down = outage
    scan(trig)
    send(trig)
    send(trig)
    for a in ANALYSES:
        g = trig.outbox.grant(a, "a1", "u1")
        assert g.state == "exchange" and g.attempts == 2 and g.error, g
    assert trig.holds_token_for("u1"), "still needed: the IdP will be asked again"
    assert {r.state for r in trig.outbox.requests()} == {"pending"}
    assert world.creates() == [] and world.prefect.secrets == {}
    world.idp.down = None
    if isinstance(outage, httpx.Response):
        world.server.off("POST", "/token")
    send(trig)
    assert {(r.key, r.state) for r in trig.outbox.requests()} == {(k, "done") for k in keys()}
    assert not trig.holds_token_for("u1")
    assert any(d.startswith("delegated peak_stats") for d in trig.decisions)
    trig.close()


def test_an_idp_refusal_makes_no_flow_run_and_drops_the_token(tmp_path):
    world = World()
    world.idp.refuse = {"error": "invalid_scope", "error_description": "alice may not run analyses on a1"}
    trig = world.trigger(tmp_path)
    scan(trig)
    send(trig)
    assert {r.state for r in trig.outbox.requests()} == {"refused"}
    assert {trig.outbox.grant(a, "a1", "u1").state for a in ANALYSES} == {"refused"}
    refused = [d for d in trig.decisions if d.startswith("REFUSED")]
    assert len(refused) == 2 and all("invalid_scope: alice may not run analyses on a1" in d for d in refused)
    assert not trig.holds_token_for("u1")
    assert [r for r in world.server.requests if r.url.host == "prefect.test"] == [], "Prefect is not asked"
    send(trig)
    assert len(world.token_requests()) == 2, "a refusal is not retried"
    trig.close()


def test_idp_unreachable_until_the_token_dies_is_recorded_in_prefect_once(tmp_path):
    """The token's exp has come: the first failed try is the last; each flow run becomes a
    Failed run in Prefect with the reason, once Prefect answers, and only once."""
    world = World()
    world.idp.down = refused_connection
    world.prefect.down = httpx.Response(503)
    trig = world.trigger(tmp_path, token=unsigned(time.time()))
    scan(trig, analyses=("peak_stats",))
    send(trig)
    assert trig.outbox.grant("peak_stats", "a1", "u1").state == "failed"
    assert {r.state for r in trig.outbox.requests()} == {"report"} and trig.outbox.pending_count() == 2
    assert not trig.holds_token_for("u1")
    world.prefect.down = None
    send(trig)
    records = world.creates()[-2:]
    assert {c["idempotency_key"] for c in records} == keys(analyses=("peak_stats",))
    for c in records:
        state = c["state"]
        assert state["type"] == "FAILED" and "could not be reached" in state["message"]
        assert "visitflow trigger --analysis peak_stats --visit a1 --run u1" in state["message"]
        assert "eyJ" not in state["message"] and SECRET not in state["message"]
    assert {(r.state, bool(r.flow_run_id)) for r in trig.outbox.requests()} == {("failed", True)}
    assert trig.outbox.pending_count() == 0
    tries = len(world.creates())
    send(trig)
    assert len(world.creates()) == tries and len(world.prefect.runs) == 2
    trig.close()


# ------------------------------------------------------------------ plan options
def test_options_the_deployment_does_not_take_are_refused_before_the_idp_is_asked(tmp_path):
    schema = {"properties": {"visit": {"type": "string"}, "run_id": {"type": "string"},
                             "background": {"type": "number"}}}
    world = World(schema)
    trig = world.trigger(tmp_path)
    scan(trig, analyses=("peak_stats",), analysis_options={"peak_stats": {"bakground": 2}})
    send(trig)
    assert {r.state for r in trig.outbox.requests()} == {"refused"}
    assert world.token_requests() == []
    assert any("has no option bakground" in d and "background" in d for d in trig.decisions), trig.decisions
    trig.close()


def test_options_that_fit_reach_the_flow_runs(tmp_path):
    schema = {"properties": {"visit": {"type": "string"}, "run_id": {"type": "string"},
                             "background": {"type": "number"}}}
    world = World(schema)
    trig = world.trigger(tmp_path)
    scan(trig, analyses=("peak_stats",), analysis_options={"peak_stats": {"background": 1.5}})
    send(trig)
    assert {r.state for r in trig.outbox.requests()} == {"done"}
    assert [c["parameters"] for c in world.creates()] == [{"visit": "a1", "run_id": "u1", "background": 1.5}] * 2
    trig.close()


# ------------------------------------------------------------------ several beamlines
def test_the_start_documents_instrument_becomes_a_tag_never_a_parameter(tmp_path):
    """blueapi copies ``env.metadata.instrument`` into the start document: the flow runs carry it
    as ``instrument:<name>`` (the flow's raw template reads it), their parameters stay
    ``{visit, run_id}``, and a bad instrument name triggers nothing."""
    world = World()
    trig = world.trigger(tmp_path)
    scan(trig, instrument="b21")
    scan(trig, uid="u2", instrument="../i22")            # not a name: refused, nothing queued
    send(trig)
    creates = world.creates()
    assert len(creates) == 4 and {c["idempotency_key"] for c in creates} == keys()
    for c in creates:
        assert "instrument:b21" in c["tags"] and names.instrument_from_tags(c["tags"]) == "b21"
        assert c["parameters"] == {"visit": "a1", "run_id": "u1"}
    assert all(trig.outbox.grant(a, "a1", "u1").instrument == "b21" for a in ANALYSES)
    assert trig.outbox.grant(ANALYSES[0], "a1", "u2") is None
    trig.close()


def test_an_outbox_from_before_beamlines_gains_the_instrument_column(tmp_path):
    """An outbox written by an older trigger (no ``instrument`` column) opens, keeps its rows, and
    those rows' runs are created untagged, as before."""
    import sqlite3

    from visitflow.trigger.outbox import Outbox

    path = tmp_path / "trigger" / "outbox.sqlite"
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE grants (analysis TEXT, visit TEXT, run TEXT, state TEXT NOT NULL, token TEXT,
        error TEXT, attempts INTEGER DEFAULT 0, next_at REAL DEFAULT 0, created REAL, updated REAL, options TEXT,
        PRIMARY KEY (analysis, visit, run));
        INSERT INTO grants (analysis, visit, run, state, created, updated) VALUES ('peak_stats', 'a1', 'old', 'exchange', 1, 1);""")
    db.close()
    box = Outbox(path)
    old = box.grant("peak_stats", "a1", "old")
    assert (old.state, old.instrument) == ("exchange", None)
    assert box.add_grant("peak_stats", "a1", "new", None, "i22") and box.grant("peak_stats", "a1", "new").instrument == "i22"
    box.reset_grant("peak_stats", "a1", "new")             # a by-hand re-run naming no instrument keeps it
    assert box.grant("peak_stats", "a1", "new").instrument == "i22"
    box.close()
