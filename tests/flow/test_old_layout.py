"""What a facility stored in Prefect with the previous layout (commit 6e53c81, before issue 17
moved the Block to ``visitflow.flow.credentials`` and the worker to ``visitflow.worker.worker``)
keeps loading and running with this code.

The records in tests/fixtures/old_layout/ are what Prefect's REST API returned after the *old*
code saved them (tests/fixtures/old_layout/record.py says how, and re-records them): the
``visitflow-scoped-credentials`` block type, its schema, three documents (``blocks/local.py``'s,
``blocks/kubernetes.py``'s and a single-machine one carrying the secret ``client_secret``), the
``visitflow``-type pool ``visitflow-local`` and a ``process`` pool, and the deployments
``prefect deploy`` made from prefect.yaml plus the warm-worker test flow ``hello`` on both pools.

They are put into a fresh, real Prefect server through its REST API exactly as stored (same
slug, same schema fields — so the server computes the same checksum —, same document data).
Then the new code loads them, and the new workers run the old deployments.  The one change
made to the records is the checkout directory in the deployments' pull steps (a machine
path: the recording's old checkout becomes this checkout; ``hello`` moved from tests/ to
tests/fixtures/ with the test reorganisation).
"""

from __future__ import annotations

import html
import json
import re
import time
import uuid
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.settings import PREFECT_API_URL, temporary_settings

from visitflow.core.prefect_api import PrefectAPI
from visitflow.stack import prefect as pstack
from visitflow.stack.services import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "tests" / "fixtures" / "old_layout"
SLUG = "visitflow-scoped-credentials"
OLD_COMMIT = "6e53c81"


def record(name: str):
    return json.loads((RECORDS / f"{name}.json").read_text())


RECORDED = record("recorded")
DOCUMENTS = {d["name"]: d for d in record("block_documents")}
(SCHEMA,) = record("block_schemas")


def test_the_records_are_the_old_layouts():
    """Guards the fixture itself: recorded from the old commit, all three documents, the
    secret stored (not masked), one schema that every document uses."""
    assert RECORDED["commit"].startswith(OLD_COMMIT)
    assert record("block_type")["slug"] == SLUG
    assert sorted(DOCUMENTS) == ["facility", "single-machine", "visitflow"]
    assert DOCUMENTS["single-machine"]["data"]["client_secret"] == RECORDED["single_machine_secret"]
    assert SCHEMA["fields"]["secret_fields"] == ["client_secret"]
    assert {d["block_schema"]["checksum"] for d in DOCUMENTS.values()} == {SCHEMA["checksum"]}
    assert {p["type"] for p in record("work_pools")} == {"visitflow", "process"}


def _map_paths(value):
    """The pull steps' directories: the recording's old checkout -> this checkout."""
    text = json.dumps(value)
    text = text.replace(json.dumps(RECORDED["hello_dir"])[1:-1], str(REPO / "tests" / "fixtures"))
    text = text.replace(json.dumps(RECORDED["old_root"])[1:-1], str(REPO))
    return json.loads(text)


def load_records(api: PrefectAPI) -> None:
    """Put the records into the server as a facility's database holds them."""
    bt = record("block_type")
    type_id = api.request("POST", "/block_types/", json={
        k: bt[k] for k in ("name", "slug", "logo_url", "documentation_url", "description", "code_example")})["id"]
    schema = api.request("POST", "/block_schemas/", json={
        "block_type_id": type_id, "fields": SCHEMA["fields"], "capabilities": SCHEMA["capabilities"],
        "version": SCHEMA["version"]})
    assert schema["checksum"] == SCHEMA["checksum"], "the server recomputes the stored checksum from the fields"
    for doc in DOCUMENTS.values():
        api.request("POST", "/block_documents/", json={
            "name": doc["name"], "data": doc["data"], "block_schema_id": schema["id"], "block_type_id": type_id,
            "is_anonymous": doc["is_anonymous"]})
    for pool in record("work_pools"):
        api.request("POST", "/work_pools/", json={k: pool[k] for k in (
            "name", "type", "base_job_template", "description", "concurrency_limit", "is_paused",
            "storage_configuration")})
        for queue in pool["queues"]:
            if queue["name"] != "default":
                api.request("POST", f"/work_pools/{pool['name']}/queues/", json={k: queue[k] for k in (
                    "name", "description", "concurrency_limit", "priority", "is_paused")})
    fields = ("name", "description", "entrypoint", "path", "pull_steps", "job_variables", "parameters",
              "parameter_openapi_schema", "enforce_parameter_schema", "tags", "labels", "version", "paused",
              "schedules", "concurrency_limit", "work_pool_name", "work_queue_name")
    for dep in record("deployments"):
        flow = api.request("POST", "/flows/", json={"name": dep["flow_name"]})
        api.request("POST", "/deployments/", json={
            **{k: dep[k] for k in fields}, "pull_steps": _map_paths(dep["pull_steps"]), "flow_id": flow["id"]})


@pytest.fixture(scope="module")
def old_server(tmp_path_factory):
    """A fresh real Prefect server holding only Prefect's own blocks plus the old records."""
    state = tmp_path_factory.mktemp("old-layout")
    port = free_port()
    server = pstack.start_server(state, port, ui=False)
    try:
        server.wait_ready(timeout=180)
        env = pstack.prefect_env(f"http://127.0.0.1:{port}/api", state / "prefect")
        with PrefectAPI(env["PREFECT_API_URL"]) as api:
            assert api.request("GET", f"/block_types/slug/{SLUG}", ok404=True) is None, \
                "a fresh server must not know the type yet: what loads below is the record"
            load_records(api)
            yield state, env, api
    finally:
        server.stop()


@pytest.fixture
def new_client(old_server):
    """Prefect's client in this process (the new code) pointed at the old records' server."""
    _, env, _ = old_server
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def test_the_server_holds_the_records_as_stored(old_server):
    _, _, api = old_server
    schemas = _schemas(api)
    assert [s["checksum"] for s in schemas] == [SCHEMA["checksum"]]
    for name, doc in DOCUMENTS.items():
        stored = api.request("GET", f"/block_types/slug/{SLUG}/block_documents/name/{name}",
                             params={"include_secrets": "true"})
        assert stored["data"] == doc["data"], name


def _schemas(api: PrefectAPI) -> list[dict]:
    type_id = api.request("GET", f"/block_types/slug/{SLUG}")["id"]
    return api.request("POST", "/block_schemas/filter", json={"block_schemas": {"block_type_id": {"any_": [type_id]}}})


def _same_values(block, name: str) -> None:
    recorded = DOCUMENTS[name]["data"]
    dumped = block.model_dump(mode="json", context={"include_secrets": True})
    assert dumped.pop("block_type_slug") == SLUG
    # every stored value read back as stored (a renamed or retyped field would drop or change it)
    assert {k: dumped.get(k, "<missing>") for k in recorded} == recorded, name


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_scoped_credentials_load_the_stored_documents(old_server, new_client, name, monkeypatch):
    import visitflow.blocks
    from visitflow.blocks import ScopedCredentials
    from visitflow.errors import VisitflowError

    assert Path(visitflow.blocks.__file__).parent == REPO / "visitflow", "the new code runs here"
    assert ScopedCredentials.__module__ == "visitflow.flow.credentials"
    monkeypatch.setenv("VISITFLOW_CLIENT_SECRET", "from-the-worker-environment")
    creds = ScopedCredentials.load(name, _sync=True)
    _same_values(creds, name)
    by_slug = Block.load(f"{SLUG}/{name}", _sync=True)
    assert type(by_slug) is ScopedCredentials
    _same_values(by_slug, name)
    # working objects: the secret, the layout, and a real call to the server
    expected_secret = (RECORDED["single_machine_secret"] if name == "single-machine"
                       else "from-the-worker-environment")
    assert creds.secret() == by_slug.secret() == expected_secret
    data = DOCUMENTS[name]["data"]
    path = creds.layout().raw.format(instrument="i22", proposal="cm1", visit="a1", run="r1")
    assert path == data["raw_template"].format(instrument="i22", proposal="cm1", visit="a1", run="r1")
    run_id = str(uuid.uuid4())
    with pytest.raises(VisitflowError, match="no delegation grant stored") as missing:
        creds.for_run("a1", run_id, "saxs_average")   # reads the (absent) grant Secret from the server
    assert data["grant_prefix"] in str(missing.value)


def test_the_schema_is_unchanged_by_the_new_layout():
    """Found true: the new code's schema — hence its checksum — is exactly the stored one, so
    ``save``/``register_type_and_schema`` from the new code adds no second schema version.
    Should a field change on purpose, this test is the one to update (old documents keep their
    schema and still load: the test above)."""
    from visitflow.blocks import ScopedCredentials

    assert ScopedCredentials.get_block_type_slug() == SLUG
    assert ScopedCredentials.model_json_schema() == SCHEMA["fields"]
    assert ScopedCredentials._calculate_schema_checksum() == SCHEMA["checksum"]
    assert ScopedCredentials.get_block_schema_version() == SCHEMA["version"]


def test_the_stored_code_example_still_imports():
    """The UI shows the block type's code example; the stored one (old layout) and the one the
    new code registers both import from the public path, and that import works."""
    from visitflow.blocks import ScopedCredentials

    def imports(example: str) -> list[str]:
        return re.findall(r"^from \S+ import .+$", html.unescape(example), flags=re.M)

    stored = imports(record("block_type")["code_example"])
    assert stored == ["from visitflow.blocks import ScopedCredentials"]
    new = ScopedCredentials._to_block_type()
    assert html.unescape(new.code_example) == html.unescape(record("block_type")["code_example"])
    assert new.description == record("block_type")["description"]
    scope: dict = {}
    exec(stored[0], scope)
    assert scope["ScopedCredentials"] is ScopedCredentials


def test_new_code_registering_keeps_the_stored_schema(old_server, new_client):
    _, _, api = old_server
    from visitflow.blocks import ScopedCredentials

    ScopedCredentials.register_type_and_schema()
    schemas = _schemas(api)
    assert [s["checksum"] for s in schemas] == [SCHEMA["checksum"]], "no second schema version"
    block_type = api.request("GET", f"/block_types/slug/{SLUG}")
    for key in ("name", "description", "logo_url", "documentation_url"):
        assert block_type[key] == record("block_type")[key], key
    assert html.unescape(block_type["code_example"]) == html.unescape(record("block_type")["code_example"])


def _wait_for_worker(api: PrefectAPI, pool: str, worker, timeout: float = 240) -> None:
    """Ready = the pool lists this worker (its first heartbeat), read from the server rather
    than from a health port another process on this machine might answer; a worker that
    exits instead (e.g. "Could not find a package for worker type 'visitflow'") fails here."""
    deadline = time.monotonic() + timeout
    while True:
        assert worker.process.poll() is None, f"{worker.name} exited:\n{worker.log_tail()}"
        names = [w["name"] for w in api.request("POST", f"/work_pools/{pool}/workers/filter", json={})]
        if worker.name in names:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{worker.name} never reached pool {pool}:\n{worker.log_tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def workers(old_server):
    """The new code's warm worker on the stored ``visitflow`` pool (its stored base job
    template) and a stock process worker on the stored ``process`` pool."""
    state, env, api = old_server
    started = []
    try:
        for pool, kind in (("visitflow-local", "visitflow"), ("visitflow-process", "process")):
            worker = pstack.start_worker(state, env, health_port=free_port(), name=f"{pool}-worker",
                                         client_secret="unused-secret", worker_type=kind, pool=pool)
            started.append((pool, worker))
        for pool, worker in started:
            _wait_for_worker(api, pool, worker)
        yield [worker for _, worker in started]
    finally:
        for _, worker in started:
            worker.stop()


def _run(api: PrefectAPI, deployment: str, parameters: dict) -> dict:
    fr = api.create_flow_run(deployment, parameters, idempotency_key=str(uuid.uuid4()))
    return api.wait_for_flow_run(fr["id"], timeout=300, interval=0.3)


@pytest.mark.parametrize("deployment", ["hello/old-warm", "hello/old-process"])
def test_old_deployments_run_to_completed_on_the_new_workers(old_server, workers, deployment):
    _, _, api = old_server
    done = _run(api, deployment, {"x": 21})
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert done["work_pool_name"] == ("visitflow-local" if deployment.endswith("warm") else "visitflow-process")


def test_old_analysis_deployment_reaches_the_stored_credentials(old_server, workers):
    """``saxs-average/post`` as prefect.yaml deployed it on the old layout: the new warm worker
    pulls, imports flows/saxs_average.py (``from visitflow import analysis``), and the flow loads
    the stored ``visitflow`` document named by the stored job variables, whose ``for_run`` then
    finds no grant — nothing is stored for this run, so that failure is the expected end, and
    proves every step before it."""
    _, _, api = old_server
    run_id = str(uuid.uuid4())
    done = _run(api, "saxs-average/post", {"visit": "a1", "run_id": run_id})
    assert done["state"]["type"] == "FAILED", done["state"]
    message = done["state"]["message"]
    assert "no delegation grant stored" in message, message
    assert DOCUMENTS["visitflow"]["data"]["grant_prefix"] in message and run_id[:8] in message, message
