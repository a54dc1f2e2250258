"""Staff recovery (issue 21 item 6; visitflow/token_service/acting.py): after an outage of the
token service longer than the user's token lives, the Failed run's message gives a command that
facility staff run with their *own* facility login — no ``blueapi`` secret — acting for the
user: the grant keeps the user's ``sub``, names the staff member in ``act``, is one run's.

Real servers: this suite's facility IdP (``ops_idp``), a real OPA with deployments/opa/ as
shipped, the token service in production mode (deployments/token-service.yaml as shipped, with
this IdP and OPA), Tiled with visitflow's plug-ins trusting both, a Prefect server + worker.

Emulated: the staff member's facility login.  The dev IdP has no user ``dave`` (OPA's beamline
staff) and its login client gives no ``visitflow-staff`` audience, so dave's token is signed by
the facility IdP's own key with those claims (what a Keycloak audience mapper would add)."""

from __future__ import annotations

import json
import shlex
import time
import uuid

import httpx
import jwt
import pytest

from tests.fixtures.federation_fixtures import TS_SECRETS, _spawn, start_token_service
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.scans import run_scan, user_root
from tests.ops.test_runbooks import run_runbook
from visitflow.core.oauth import TOKEN_EXCHANGE
from visitflow.trigger import outage

pytestmark = pytest.mark.ops

OPTIONS = {"background": 1.5}
STAFF_AUD = ["blueapi", "tiled", outage.STAFF_CLIENT]
STAFF_SAYS = "facility staff run, with their own login: "


def facility_token(idp, user: str, life: int = 300, aud=("blueapi", "tiled")) -> str:
    """A facility access token of ``user`` signed by the facility IdP's real key."""
    now = int(time.time())
    return idp.sign(idp.claims(sub=user, preferred_username=user, aud=list(aud), exp=now + life, iat=now, nbf=now,
                               scope="openid profile"))


def run_scope(visit: str, run: str, analysis: str = "peak_stats") -> str:
    return f"run:{analysis}:{visit} read:raw:{visit}/{run} write:processed:{visit}/{run}"


def act_for(ts, staff_token: str, user: str, scope: str, client_id: str = outage.STAFF_CLIENT,
            secret: str | None = None) -> httpx.Response:
    form = {"grant_type": TOKEN_EXCHANGE, "subject_token": staff_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "requested_subject": user, "audience": "visitflow", "scope": scope}
    if secret:
        return httpx.post(f"{ts.issuer}/token", data=form, auth=(client_id, secret), timeout=10)
    return httpx.post(f"{ts.issuer}/token", data={**form, "client_id": client_id}, timeout=10)


@pytest.fixture(scope="module")
def staff_ts(tmp_path_factory, ops_idp, ops_opa):
    handle = start_token_service(tmp_path_factory.mktemp("staff-ts"), ops_idp.issuer, ops_opa.url)
    yield handle
    handle.service.stop()


# ------------------------------------------------------------------ the token service decides
def test_staff_grant_keeps_the_users_sub_names_the_staff_in_act_and_is_one_runs(ops_idp, staff_ts):
    run = uuid.uuid4().hex
    r = act_for(staff_ts, facility_token(ops_idp, "dave", aud=STAFF_AUD), "alice", run_scope("a1", run))
    assert r.status_code == 200, r.text
    grant = jwt.decode(r.json()["access_token"], options={"verify_signature": False})
    assert grant["sub"] == "alice" and grant["preferred_username"] == "alice"
    assert grant["act"] == {"sub": "dave"} and grant["aud"] == "visitflow"
    assert set(grant["scope"].split()) == set(run_scope("a1", run).split())
    assert "refresh_token" not in r.json()
    # the second hop, as a flow run makes it: OPA asked again for alice; act nests
    data = staff_ts.exchange(r.json()["access_token"], "visitflow", audience="tiled",
                             scope=f"read:raw:a1/{run} write:processed:a1/{run}")
    claims = jwt.decode(data["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "visitflow", "act": {"sub": "dave"}}


@pytest.mark.parametrize("staff, user, scope, status, error, reason", [
    # a session member who is not beamline staff may not act for another member (OPA's reason)
    ("carol", "alice", run_scope("a1", "r-1"), 403, "access_denied",
     "carol may not act for alice on session a1 (proposal cm12345, beamline i22): not staff of beamline i22"),
    # staff may not act for a user on a session the user is not on (a2 is on dave's beamline too)
    ("dave", "alice", run_scope("a2", "r-1"), 403, "access_denied", "alice is not a member of session a2"),
    # staff cannot widen: a visit-wide data scope, a second visit, no run: scope
    ("dave", "alice", "run:peak_stats:a1 read:raw:a1 write:processed:a1/r-1", 403, "invalid_scope",
     "never a whole visit"),
    ("dave", "alice", run_scope("a1", "r-1") + " read:raw:a2/r-1", 403, "invalid_scope", "one visit (asked for 2)"),
    ("dave", "alice", "read:raw:a1/r-1", 403, "invalid_scope", "a run:<analysis>:<visit> scope"),
    # ... nor beyond what the user may have: carol is a member of a1 but not an analyst
    ("dave", "carol", run_scope("a1", "r-1"), 403, "access_denied",
     "carol may not start analyses on session a1"),
])
def test_refusals_carry_the_reason(ops_idp, staff_ts, staff, user, scope, status, error, reason):
    r = act_for(staff_ts, facility_token(ops_idp, staff, aud=STAFF_AUD), user, scope)
    assert r.status_code == status and r.json()["error"] == error, r.text
    assert reason in r.json()["error_description"], r.text


def test_only_the_staff_client_acts_for_users_and_only_on_a_facility_token_meant_for_it(ops_idp, staff_ts):
    scope = run_scope("a1", "r-1")
    # the trigger's own client cannot be used to act for someone (requested_subject)
    r = act_for(staff_ts, facility_token(ops_idp, "dave", aud=STAFF_AUD), "alice", scope, client_id="blueapi",
                secret=TS_SECRETS["blueapi"])
    assert r.status_code == 403 and r.json()["error"] == "unauthorized_client", r.text
    # a staff login not meant for the staff client (a token blueapi was given) is refused
    r = act_for(staff_ts, facility_token(ops_idp, "dave"), "alice", scope)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token", r.text
    # a grant of the token service's own is no staff credential
    grant = staff_ts.exchange(facility_token(ops_idp, "alice"), "blueapi", audience="visitflow",
                              scope=run_scope("a1", "r-1"))["access_token"]
    r = act_for(staff_ts, grant, "alice", scope)
    assert r.status_code == 401 and "not the facility IdP" in r.json()["error_description"], r.text
    # the staff client is no ordinary exchange client: without requested_subject it still acts-for only
    r = httpx.post(f"{staff_ts.issuer}/token", timeout=10, data={
        "grant_type": TOKEN_EXCHANGE, "client_id": outage.STAFF_CLIENT, "audience": "visitflow", "scope": scope,
        "subject_token": facility_token(ops_idp, "dave", aud=STAFF_AUD),
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text


# ------------------------------------------------------------------ end to end after an outage
def outage_plan(det, saxs, motor, md):
    import bluesky.plans as bp

    from visitflow.trigger.plans import uses_analyses

    @uses_analyses("peak_stats", options={"peak_stats": OPTIONS})
    def scan():
        return (yield from bp.scan([det, saxs], motor, -2, 2, 9, md=md))

    return scan()


@pytest.fixture(scope="module")
def staff_tiled(tmp_path_factory, staff_ts, ops_idp, ops_opa):
    """Tiled as at a facility: run tokens from the token service, users' own from the IdP."""
    from tests.fixtures.tiled_fixtures import VISITS, start_tiled
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    handle = start_tiled(staff_ts, tmp_path_factory.mktemp("staff-tiled"), extra_args=(
        "--user-issuer", ops_idp.issuer, "--authority-url", ops_opa.url, "--authority-cache", "2"))
    try:
        ensure_visits(handle.uri, admin_auth(staff_ts.issuer, "visitflow-admin", TS_SECRETS["visitflow-admin"]),
                      VISITS, layout=handle.layout)
        yield handle
    finally:
        handle.service.stop()


def test_after_a_token_service_outage_staff_recover_the_run_with_their_own_login(tmp_path, ops_idp, staff_ts,
                                                                                 staff_tiled):
    from tests.fixtures.prefect_fixtures import running_prefect
    from visitflow.flow.sink import read_result
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    with running_prefect(tmp_path / "prefect", issuer=staff_ts.issuer, tiled_uri=staff_tiled.uri,
                         client_secret=TS_SECRETS["visitflow"]) as prefect:
        docs: list = []
        uid = run_scan(staff_tiled.uri, facility_token(ops_idp, "alice"), plan=outage_plan,
                       subscribers=[lambda name, doc: docs.append((name, doc))])
        life = 10
        user_token = facility_token(ops_idp, "alice", life=life)
        staff_ts.service.stop()                    # the outage: the token service's process is gone
        try:
            trig = AnalysisTrigger(TriggerSettings(issuer=staff_ts.issuer, prefect_api_url=prefect.api_url,
                                                   client_secret=TS_SECRETS["blueapi"], state_dir=tmp_path / "trig",
                                                   max_backoff=1.0), token=user_token)
            for name, doc in docs:
                trig(name, doc)
            assert trig.flush(life + 90), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
            trig.close()
        finally:                                   # back, on the same port with the same state
            staff_ts.service = _spawn(staff_ts.config_path, staff_ts.state_dir, staff_ts.port)
            staff_ts.service.wait_ready(timeout=60)
        runs = {r["name"].split()[0]: r for r in prefect.api.flow_runs(tags=[f"run:{uid}"])}
        assert set(runs) == {"peak-stats/live", "peak-stats/post"}, list(runs)
        message = prefect.api.flow_run(runs["peak-stats/post"]["id"])["state"]["message"]
        assert "could not be reached" in message and STAFF_SAYS in message, message
        command = shlex.split(message.split(STAFF_SAYS)[1].split(" ; or the user runs: ")[0])
        assert command[:2] == ["visitflow", "trigger"] and command[-3:] == ["--token-env", "<VAR>", "--wait"]
        assert command[command.index("--for") + 1] == "alice" and command[command.index("--run") + 1] == uid

        # Dave (beamline staff) follows docs/operations.md's runbook with his own login: the
        # message's command, no client secret in his environment.
        value = lambda flag: command[command.index(flag) + 1]
        assert value("--options") == json.dumps(OPTIONS, separators=(",", ":"))
        out = run_runbook("staff-recovery", {
            **prefect.env, "FLOW_RUN": runs["peak-stats/post"]["id"], "TS": staff_ts.issuer,
            "ANALYSIS": value("--analysis"), "VISIT": value("--visit"), "RUN": value("--run"),
            "OPTIONS": value("--options"), "FOR_USER": value("--for"), "VISITFLOW_TRIGGER_CLIENT_SECRET": "",
            "STAFF_TOKEN": facility_token(ops_idp, "dave", aud=STAFF_AUD)})
        shown, _, ran = out.partition("\n")
        assert shlex.split(shown.split(STAFF_SAYS)[1]) == command, shown
        assert "peak-stats/post" in ran and "COMPLETED" in ran, out
        after = prefect.api.flow_runs(tags=[f"run:{uid}"])
        assert sorted(r["state"]["type"] for r in after) == ["COMPLETED", "FAILED", "FAILED"], after
        (recovered,) = [r for r in after if r["state"]["type"] == "COMPLETED"]
        # Prefect's record of the run names who acted: the flow run's own log line
        assert "acting for alice via dave" in prefect.logs(recovered["id"], wait_for="acting for")

    # Alice reads the result with her own token: it is hers, Dave is named as who acted.
    root = user_root(staff_tiled.uri, facility_token(ops_idp, "alice"))
    node = root[f"processed/a1/{uid}/peak_stats"]
    assert_matches(read_result(node), reference_of("peak_stats", root[f"raw/a1/{uid}/primary"], **OPTIONS))
    meta = node[node.metadata["current"]].metadata
    assert meta["status"] == "complete" and meta["frames_processed"] == 9 and meta["options"] == OPTIONS
    assert meta["token_sub"] == "alice" and meta["token_act"] == {"sub": "visitflow", "act": {"sub": "dave"}}
    log = (staff_ts.state_dir.parent / "logs").glob("token-service*.log")
    assert any("staff=dave acts for user=alice" in p.read_text() for p in log), "the token service logs who acted"
