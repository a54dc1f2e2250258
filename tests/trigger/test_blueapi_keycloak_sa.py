"""blueapi 1.21.1 in ``tiled.authentication: ServiceAccount`` mode with the service account a
real Keycloak client, as Diamond runs it: ``i22-blueapi-tiled`` of the shipped facility realm
(client credentials, ``aud: tiled``, a ``beamline`` claim), decided by OPA in Tiled
(deployments/opa/authz.rego: a beamline's service account reads and writes its beamline's raw
data only).  Users log in at Keycloak; the trigger exchanges the caller's Keycloak token, taken
from begin_task's pass-through headers, at the token service.

Real Keycloak (the session's), OPA, token service, Tiled, Prefect + warm worker and ``blueapi
serve``: tests/fixtures/blueapi_facility.py.  (tests/trigger/test_blueapi_service_account.py runs the same mode
on the dev token service's client-credentials client.)
"""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from visitflow.core.prefect_api import PrefectAPI
from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.core.tokens import unverified_claims
from visitflow.tiled.raw_runs import WRITER_PREFIX

from tests.fixtures import blueapi_stack as bs
from tests.fixtures.blueapi_facility import OTHER_SA_CLIENT, SA_CLIENT, running_facility_blueapi
from tests.fixtures.blueapi_fixtures import require_venv
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.waiting import wait_until
from tests.trigger.test_blueapi import flow_runs_of, outputs_of, raw_run, run_uid, settled, wait_flow_runs

pytestmark = [pytest.mark.blueapi, pytest.mark.keycloak]

SESSION_PATH = f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"
B21_PATH = f"{bs.B21_INSTRUMENT}/{bs.B21_PROPOSAL}/{bs.B21_SESSION}"


@pytest.fixture(scope="module")
def fb(tmp_path_factory, keycloak):
    require_venv()
    with running_facility_blueapi(tmp_path_factory.mktemp("blueapi-keycloak-sa"), keycloak) as stack:
        yield stack


@pytest.fixture(scope="module")
def prefect(fb):
    api = PrefectAPI(fb.prefect_api)
    yield api
    api.close()


@pytest.fixture(scope="module")
def alice_run(fb):
    """One SA-mode scan by Alice through blueapi: its uid."""
    return run_uid(fb.blueapi.run(fb.token("alice"), "peak_scan", {"num": 10, "seed": 11}))


def whoami(fb, token: str) -> dict:
    r = httpx.get(f"{fb.tiled.uri}/api/v1/auth/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _post_node(fb, path: str, token: str, key: str) -> httpx.Response:
    return fb.tiled.request("POST", f"metadata/{path}", token, json={
        "id": key, "structure_family": "container", "metadata": {}, "specs": [], "data_sources": []})


def test_the_service_account_is_keycloaks_and_names_its_beamline(fb):
    """What blueapi writes with: a Keycloak client-credentials token (not a user's, not the dev
    IdP's) with Tiled in its audience and the beamline claim the policy matches."""
    claims = unverified_claims(fb.sa_token())
    assert claims["iss"] == fb.facility.issuer and claims["azp"] == SA_CLIENT
    assert claims["beamline"] == bs.INSTRUMENT and "tiled" in ([claims["aud"]] if isinstance(claims["aud"], str)
                                                                else claims["aud"])
    assert claims["preferred_username"] == f"service-account-{SA_CLIENT}"
    cfg = (fb.blueapi.service.log_path.parent.parent / "blueapi.yaml").read_text()
    assert f"client_id: {SA_CLIENT}" in cfg and f"issuer: {fb.facility.issuer}" in cfg, cfg


def test_sa_mode_scan_live_and_post_equal_numpy_and_the_sa_is_the_raw_writer(fb, prefect, alice_run):
    uid, alice = alice_run, fb.token("alice")
    run = raw_run(fb, alice, uid)     # Alice reads it with her own Keycloak token (OPA: a member)
    assert run.metadata["stop"]["exit_status"] == "success" and run["primary"]["det"].read().shape == (10,)

    # Append-only raw data records its writer: the service account's principal, not Alice's.
    sa_uuid, alice_uuid = (uuid.UUID(whoami(fb, t)["uuid"]).hex for t in (fb.sa_token(), alice))
    assert sa_uuid != alice_uuid
    for path in (f"{SESSION_PATH}/{uid}", f"{SESSION_PATH}/{uid}/primary"):
        r = fb.tiled.get(f"metadata/{path}", alice)
        assert r.status_code == 200, r.text
        writers = [t for t in r.json()["data"]["attributes"]["access_tags"] if t.startswith(WRITER_PREFIX)]
        assert writers == [f"{WRITER_PREFIX}{sa_uuid}"], (path, writers)
    r = _post_node(fb, f"{SESSION_PATH}/{uid}", alice, "alice-appends")
    assert r.status_code == 403 and "only the writer" in r.text, (r.status_code, r.text)

    runs = wait_flow_runs(prefect, uid, 2)
    assert sorted(next(t for t in r["tags"] if t.startswith("variant:")) for r in runs) == ["variant:live",
                                                                                           "variant:post"]
    for r in runs:
        done = prefect.wait_for_flow_run(r["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", (r["name"], done["state"])
    _, requests = wait_until(lambda: settled(fb, uid), 60, f"trigger did not settle {uid}")
    assert sorted((r["variant"], r["state"]) for r in requests) == [("live", "done"), ("post", "done")]
    assert len(flow_runs_of(prefect, uid)) == 2

    root = connect(fb.tiled.uri, BearerAuth(lambda: alice))
    node = root[f"processed/{bs.SESSION}/{uid}/peak_stats"]
    want = reference_of("peak_stats", raw_run(fb, alice, uid)["primary"])
    for child in (node["live"], next(node[k] for k in node if k.startswith("post-"))):
        assert child.metadata["status"] == "complete", child.metadata
        assert_matches(outputs_of(child), want, rtol=1e-9, atol=1e-9, where="peak_stats/")
    # Whose rights the analyses used: Alice's (Keycloak's subject id), not the service account's.
    assert node["live"].metadata["token_sub"] == fb.facility.sub("alice")
    assert re.search(rf"visitflow trigger: created peak_stats/post/{bs.SESSION}/{uid} flow run", fb.blueapi.log())


def test_the_service_account_reads_no_other_beamline_and_writes_no_processed_data(fb, alice_run):
    sa, b21_sa = fb.sa_token(), fb.sa_token(bs.B21_INSTRUMENT)
    # b21's own service account writes a run of its beamline's session...
    r = _post_node(fb, B21_PATH, b21_sa, "b21-run")
    assert r.status_code == 200, r.text
    assert fb.tiled.get(f"metadata/{B21_PATH}/b21-run", b21_sa).status_code == 200
    # ...which i22's cannot see, list or add to.
    for path in (B21_PATH, f"{B21_PATH}/b21-run"):
        assert fb.tiled.get(f"metadata/{path}", sa).status_code in (403, 404), path
    assert "b21-run" not in str(fb.tiled.get(f"search/{B21_PATH}", sa).text)
    assert _post_node(fb, B21_PATH, sa, "i22-sa-in-b21").status_code in (403, 404)
    # Processed data: neither read (Alice's results) nor written.
    assert fb.tiled.get(f"metadata/processed/{bs.SESSION}/{alice_run}", sa).status_code in (403, 404)
    r = _post_node(fb, f"processed/{bs.SESSION}", sa, "sa-made-this")
    assert r.status_code in (403, 404), (r.status_code, r.text)
    # OPA's own reasons for those refusals (what Tiled asked).
    subject = {"preferred_username": f"service-account-{SA_CLIENT}", "beamline": bs.INSTRUMENT}
    d = fb.opa.decide({"subject": subject, "action": "write", "store": "processed", "visit": bs.SESSION})
    assert not d["allow"] and "processed data: it writes raw runs only" in d["reason"], d
    d = fb.opa.decide({"subject": subject, "action": "read", "store": "raw", "visit": bs.B21_SESSION})
    assert not d["allow"] and f"writes for beamline {bs.INSTRUMENT}, not for session {bs.B21_SESSION}" in d["reason"]
    # Nor can it start analyses: the token service refuses to exchange it.
    r = fb.token_service.exchange_response(sa, "blueapi", audience="visitflow",
                                           scope=f"run:peak_stats:{bs.SESSION}")
    assert r.status_code in (400, 401, 403), r.text


def test_a_wrong_beamline_service_account_is_refused_with_a_reason(fb):
    """b21's service account writing a run into i22's session: refused (Tiled: 404, the session
    is not disclosed to it), and the authority's reason says why."""
    r = _post_node(fb, SESSION_PATH, fb.sa_token(bs.B21_INSTRUMENT), "wrong-beamline")
    # Tiled does not disclose a session to a token that may not read it (as for Bob): a 404;
    # the reason is OPA's answer to the question Tiled asked, checked below.
    assert r.status_code == 404 and "No such entry" in r.text, (r.status_code, r.text)
    assert fb.tiled.get(f"metadata/{SESSION_PATH}/wrong-beamline", fb.sa_token()).status_code == 404
    subject = {"preferred_username": f"service-account-{OTHER_SA_CLIENT}", "beamline": bs.B21_INSTRUMENT}
    d = fb.opa.decide({"subject": subject, "action": "write", "store": "raw", "visit": bs.SESSION})
    assert not d["allow"] and d["reason"] == (
        f"service account service-account-{OTHER_SA_CLIENT} writes for beamline {bs.B21_INSTRUMENT}, not for "
        f"session {bs.SESSION} (proposal {bs.PROPOSAL}, beamline {bs.INSTRUMENT})"), d
