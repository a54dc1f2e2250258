"""The demo story at a facility: real Keycloak as facility IdP + real OPA + the token service in
production mode + real Tiled + real Prefect server and worker, driven by the real trigger
on real RunEngine scans written with the user's own token (as blueapi does).

* Alice's live and post complete — with the token service restarted mid-scan: the post run
  still exchanges its grant (signing keys persist);
* Carol (member, no analysis rights in OPA's data) is refused at the exchange with OPA's
  reason and gets no flow run;
* Bob cannot see Alice's session.
(T_data refused the session's other run / another session: test_facility_tiled.py.)
"""

from __future__ import annotations

import threading
import time

import jwt
import pytest

from tests.fixtures.federation_fixtures import TS_SECRETS
from tests.fixtures.prefect_fixtures import running_prefect
from tests.fixtures.scans import held_scan, run_scan, start_scan_thread, user_root
from visitflow.trigger import AnalysisTrigger, TriggerSettings

pytestmark = [pytest.mark.opa, pytest.mark.e2e]


@pytest.fixture(scope="module")
def facility_prefect(tmp_path_factory, token_service, facility_tiled):
    """A Prefect server + worker whose ScopedCredentials block points at the token service."""
    with running_prefect(tmp_path_factory.mktemp("facility-prefect"), issuer=token_service.issuer,
                         tiled_uri=facility_tiled.uri, client_secret=TS_SECRETS["visitflow"]) as stack:
        yield stack.api


def saxs_plan(det, saxs, motor, md):
    import bluesky.plans as bp

    from visitflow.trigger.plans import uses_analyses

    @uses_analyses("saxs_average")
    def my_scan():
        return (yield from bp.scan([det, saxs], motor, -2, 2, 16, md=md))

    return my_scan()


def trigger_for(tmp_path, token_service, api, user_token):
    settings = TriggerSettings(issuer=token_service.issuer, prefect_api_url=api.api_url,
                               client_secret=TS_SECRETS["blueapi"], state_dir=tmp_path / "trigger", max_backoff=1.0)
    return AnalysisTrigger(settings, token=user_token)


def test_alice_live_and_post_complete_across_a_token_service_restart(tmp_path, facility, token_service,
                                                                     facility_tiled, facility_prefect):
    api = facility_prefect
    alice = facility.token("alice")
    trig = trigger_for(tmp_path, token_service, api, alice)
    hold = threading.Event()
    started: dict = {}
    thread, out = start_scan_thread(facility_tiled.uri, alice, plan=held_scan(hold, pause_after=5),
                                    md={"analyses": ["saxs_average"]},
                                    subscribers=[trig, lambda n, d: started.setdefault("uid", d["uid"])
                                                 if n == "start" else None])
    try:
        deadline = time.monotonic() + 240
        while not _live_output_exists(facility_tiled, alice, started.get("uid")):  # live exchanged and wrote
            assert time.monotonic() < deadline and "uid" not in out, ("live never wrote", trig.decisions, out)
            time.sleep(0.5)
        restarted_mid_scan = "uid" not in out
        token_service.restart()
        hold.set()
        thread.join(300)
        assert "uid" in out, out
        assert trig.flush(60), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    finally:
        hold.set()
        trig.close()
    uid = out["uid"]
    assert restarted_mid_scan, "the scan ended before the live run wrote: restart was not mid-scan"
    runs = api.flow_runs(tags=[f"run:{uid}"])
    assert sorted(r["name"].split()[0] for r in runs) == ["saxs-average/live", "saxs-average/post"]
    for r in runs:
        done = api.wait_for_flow_run(r["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", (r["name"], done["state"])
    node = user_root(facility_tiled.uri, facility.token("alice"))[f"processed/a1/{uid}/saxs_average"]
    post = node[node.metadata["current"]]
    assert post.metadata["status"] == "complete" and post.metadata["frames_processed"] == 16
    assert post.metadata["token_sub"] == facility.sub("alice"), "Keycloak's subject id, not a username"
    assert post.metadata["token_act"] == {"sub": "visitflow", "act": {"sub": "blueapi"}}
    assert node["live"].metadata["frames_processed"] == 16
    # Bob cannot see Alice's session, raw or processed
    bob = facility.token("bob")
    for path in (f"processed/a1/{uid}", f"raw/a1/{uid}", "processed/a1"):
        assert facility_tiled.get(f"metadata/{path}", bob).status_code in (403, 404), path
    assert "a1" not in facility_tiled.keys("processed", bob)
    # grant hygiene: the runs have ended, so the sweep deletes the grant and revokes it
    from visitflow.production import grant_hygiene
    from visitflow.core import names as grants

    name = grants.grant_secret_name("saxs_average", "a1", uid)
    (doc,) = [d for d in grant_hygiene.grant_secrets(api) if d["name"] == name]
    grant = doc["data"]["value"]
    kid, key = token_service.signing_key()
    now = int(time.time())

    def fake_grant(run, exp):
        return jwt.encode({"iss": token_service.issuer, "sub": "alice", "aud": "visitflow", "exp": exp, "iat": now,
                           "jti": f"g-{run}", "scope": f"run:saxs_average:a1 read:raw:a1/{run} write:processed:a1/{run}"},
                          key, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})
    api.save_secret(grants.grant_secret_name("saxs_average", "a1", "r-expired"), fake_grant("r-expired", now - 5))
    api.save_secret(grants.grant_secret_name("saxs_average", "a1", "r-queued"), fake_grant("r-queued", now + 600))
    api.save_secret(grants.grant_secret_name("saxs_average", "a1", "r-junk"), "not-a-jwt")
    result = grant_hygiene.sweep(api, revoke=grant_hygiene.revoker(token_service.issuer, "visitflow",
                                                                   TS_SECRETS["visitflow"]))
    assert result.deleted.get(name) == "its runs have ended", result
    assert result.deleted.get(grants.grant_secret_name("saxs_average", "a1", "r-expired")) == "expired"
    assert result.deleted.get(grants.grant_secret_name("saxs_average", "a1", "r-junk")) == "not a readable visitflow grant"
    assert grants.grant_secret_name("saxs_average", "a1", "r-queued") not in result.deleted, "its post run is still to come"
    assert all(d["name"] != name for d in grant_hygiene.grant_secrets(api))
    r = token_service.exchange_response(grant, "visitflow", audience="tiled",
                                        scope=f"read:raw:a1/{uid} write:processed:a1/{uid}")
    assert r.status_code == 401 and "revoked" in r.json()["error_description"], r.text


def _live_output_exists(tiled, token, uid) -> bool:
    return uid is not None and tiled.get(f"metadata/processed/a1/{uid}/saxs_average/live", token).status_code == 200


def test_carol_is_refused_at_the_exchange_and_gets_no_flow_run(tmp_path, facility, token_service,
                                                               facility_tiled, facility_prefect):
    api = facility_prefect
    carol = facility.token("carol")
    trig = trigger_for(tmp_path, token_service, api, carol)
    try:
        uid = run_scan(facility_tiled.uri, carol, plan=saxs_plan, subscribers=[trig])
        assert trig.flush(60)
    finally:
        trig.close()
    refused = [d for d in trig.decisions if d.startswith("REFUSED")]
    assert refused and all("carol may not start analyses on session a1" in d for d in refused), trig.decisions
    assert api.flow_runs(tags=[f"run:{uid}"]) == []
    # ... while as a member she may read the raw run she wrote
    assert facility_tiled.get(f"metadata/raw/a1/{uid}", carol).status_code == 200
