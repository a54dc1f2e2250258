"""Issue 20 finding 3, the Prefect path to secrets, on a real Prefect server and the real warm
worker, run as ``visitflow up`` runs them (``running_prefect(guarded=True)``: the server needs
the stack's auth string, the worker has its own endpoint allow-list).

The attack, exactly as the red team ran it: save a second ScopedCredentials Block whose issuer
is the attacker's server, then create a flow run of a real analysis deployment whose job
variables name that Block (``VISITFLOW_CREDENTIALS_BLOCK``).  Before, the flow run discovered
the attacker's token endpoint and posted the ``visitflow`` client secret to it.  Now the worker
refuses the run (Crashed, with the reason) and the attacker's server sees no request at all.
A control run naming the legitimate Block through the same job variable completes, so the
refusal is about the endpoint, not the job variable.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.fixtures.prefect_fixtures import running_prefect
from tests.fixtures.scans import run_scan
from visitflow.core import endpoints, names as grants

pytestmark = pytest.mark.security

GRANT = "run:{a}:{v} read:raw:{v}/{r} write:processed:{v}/{r}"


class Recorder(BaseHTTPRequestHandler):
    """The attacker's 'issuer': a discovery document pointing at itself; records everything."""

    seen: list = []

    def _record(self):
        length = int(self.headers.get("content-length") or 0)
        type(self).seen.append((self.command, self.path, self.rfile.read(length).decode(errors="replace"),
                                self.headers.get("authorization")))

    def do_GET(self):
        self._record()
        base = f"http://127.0.0.1:{self.server.server_port}"
        body = json.dumps({"issuer": base, "token_endpoint": f"{base}/token", "jwks_uri": f"{base}/jwks"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self._record()
        self.send_response(400)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def attacker():
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", Recorder.seen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def guarded(idp, tiled_server, tmp_path_factory):
    with running_prefect(tmp_path_factory.mktemp("guarded-prefect"), issuer=idp.issuer,
                         tiled_uri=tiled_server.uri, guarded=True) as stack:
        yield stack


def save_block(api, name: str, data: dict) -> None:
    """A ScopedCredentials document saved through the plain REST API, as any API user can."""
    block_type = api.request("GET", f"/block_types/slug/{endpoints.BLOCK_TYPE_SLUG}")
    (schema,) = api.request("POST", "/block_schemas/filter", json={
        "block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}, "limit": 1})
    api.request("POST", "/block_documents/", json={
        "name": name, "data": data, "block_type_id": block_type["id"], "block_schema_id": schema["id"]})


def delegate(idp, stack, analysis, visit, uid):
    grant = idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                         scope=GRANT.format(a=analysis, v=visit, r=uid))["access_token"]
    stack.store_grant(analysis, visit, uid, grant)


def start(stack, analysis, visit, uid, job_env: dict) -> dict:
    fr = stack.api.create_flow_run(grants.deployment_name(analysis, "post"), {"visit": visit, "run_id": uid},
                                   idempotency_key=str(uuid.uuid4()), tags=grants.run_tags(analysis, visit, uid, "post"),
                                   job_variables={"env": job_env})
    return stack.api.wait_for_flow_run(fr["id"], timeout=300)


def test_the_guarded_api_refuses_callers_without_the_auth_string(guarded):
    anonymous = httpx.post(f"{guarded.api_url}/block_documents/filter",
                           json={"include_secrets": True}, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert guarded.api.request("POST", "/block_documents/filter", json={"limit": 1}) is not None


def test_a_flow_run_naming_an_attackers_block_is_refused_before_any_secret_leaves(idp, tiled_server, guarded,
                                                                                  attacker):
    evil, seen = attacker
    uid = run_scan(tiled_server.uri, idp.token("alice"), num=3)
    delegate(idp, guarded, "peak_stats", "a1", uid)
    save_block(guarded.api, "borrowed", {"issuer": evil, "raw_uri": tiled_server.uri, "client_id": "visitflow",
                                         "client_secret_env": "VISITFLOW_CLIENT_SECRET"})

    run = start(guarded, "peak_stats", "a1", uid, {endpoints.BLOCK_ENV: "borrowed"})
    state = run["state"]
    assert state["type"] == "CRASHED", (state, guarded.logs(run["id"]))
    assert "EndpointNotAllowed" in state["message"] and "credentials Block 'borrowed'" in state["message"] \
        and f"issuer (issuer) '{evil}' is not on this worker's allow-list" in state["message"], state
    assert seen == [], seen   # not even the discovery document was fetched

    # ... nor may the job variables widen the allow-list, or point the run at another Prefect
    for name, value in ((endpoints.ENV, f"{idp.issuer} {tiled_server.uri} {evil}"),
                        ("PREFECT_API_URL", f"{evil}/api")):
        run = start(guarded, "peak_stats", "a1", uid, {endpoints.BLOCK_ENV: "borrowed", name: value})
        assert run["state"]["type"] == "CRASHED", run["state"]
        assert f"job variables set {name}: only the worker's own environment may" in run["state"]["message"], \
            run["state"]
    assert seen == [], seen

    # control: the same job variable naming the stack's own Block runs the analysis
    run = start(guarded, "peak_stats", "a1", uid, {endpoints.BLOCK_ENV: "visitflow"})
    assert run["state"]["type"] == "COMPLETED", (run["state"], guarded.logs(run["id"]))
    assert seen == [], seen


# ---------------------------------------------------------------- the sweep race (finding 7)
# On the same guarded stack (one Prefect bring-up for the module: CI minutes).

@pytest.mark.parametrize("window, outcome", [(0, "FAILED"), (None, "COMPLETED")],
                         ids=["sweep-without-the-window-deletes-it", "sweep-keeps-it"])
def test_a_sweep_between_a_reruns_grant_and_its_flow_run(idp, tiled_server, guarded, tmp_path, window, outcome):
    """A by-hand re-run (``visitflow trigger``'s path: ``AnalysisTrigger.request``) saves its
    grant, then creates its flow run; a ``grants-sweep`` runs exactly in between (called from
    the trigger's own create step).  The earlier post run of the same triple has ended, so the
    sweep used to take the fresh grant for a finished one and delete it: the re-run then
    failed with no grant (``window=0`` is that old rule, shown failing here).  With the
    creation window the sweep keeps it, the re-run completes, and the next sweep deletes it."""
    import time

    from visitflow.production import grant_hygiene
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    uid = run_scan(tiled_server.uri, idp.token("alice"), num=3)
    # the trigger's own post run of this triple, ended (created directly in its final state)
    first = guarded.api.create_analysis_run("peak_stats", "post", "a1", uid, {}, idempotency_key=str(uuid.uuid4()),
                                            state={"type": "COMPLETED", "message": "the trigger's post run"})
    time.sleep(max(0.0, grant_hygiene._created(first) + 1.05 - time.time()))   # grant iat is whole seconds
    trigger = AnalysisTrigger(TriggerSettings(issuer=idp.issuer, prefect_api_url=guarded.api_url,
                                              prefect_auth_string=guarded.api.auth_string,
                                              client_secret="blueapi-dev-secret", state_dir=tmp_path / "trigger",
                                              max_backoff=1.0),
                              token=idp.token("alice"), start_sender=False)
    swept = []
    create = trigger._create

    def sweep_then_create(api, r):   # the race, made to happen every time
        kwargs = {} if window is None else {"creation_window": window}
        swept.append(grant_hygiene.sweep(guarded.api, **kwargs))   # its own client: 6 attempts (SQLite 503s)
        create(api, r)

    trigger._create = sweep_then_create
    name = grants.grant_secret_name("peak_stats", "a1", uid)
    try:
        trigger.request("peak_stats", "a1", uid, ("post",))
        with trigger.prefect_api() as api:   # retried as the sender does: a busy SQLite server 503s (CI run A)
            deadline = time.monotonic() + 120
            while True:
                trigger.send_once(api)
                (req,) = trigger.outbox.requests()
                if req.state == "done" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert req.state == "done", req
    finally:
        trigger.close()
    assert swept, "the sweep did not run between the grant and the flow run"
    if window == 0:
        assert swept[0].deleted.get(name) == "its runs have ended", swept
    else:
        assert name not in swept[0].deleted and swept[0].kept >= 1, swept   # kept: awaiting its flow run
    run = guarded.api.wait_for_flow_run(req.flow_run_id, timeout=300)
    assert run["state"]["type"] == outcome, (run["state"], guarded.logs(run["id"]))
    if outcome == "FAILED":
        assert "no delegation grant stored" in guarded.logs(run["id"], wait_for="no delegation grant stored")
    else:   # once the re-run has ended, the grant goes as before
        assert grant_hygiene.sweep(guarded.api).deleted.get(name) == "its runs have ended"
