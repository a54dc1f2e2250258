"""What the zygote warms once (issue 22 start-up) stays in the zygote, and never goes stale.

Two warm workers on one real Prefect server, one with ``VISITFLOW_ZYGOTE_WARM=0`` as the
control; every child records the modules it imported itself (visitflow/worker/phases.py).
* with the warm zygote a child imports none of ``RUN_PRELOAD`` (the zygote did, once);
  the control shows the test can see them (its children do import them).
* correctness over speed: a deployment's entrypoint file and a helper module next to it,
  both changed between two runs, are read afresh by the second run (the zygote never
  imports a flow's own code; Prefect re-executes the entrypoint in each child).
No timings are asserted here: speed is benchmarks/child_startup.py's.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from visitflow.stack import prefect as pstack
from visitflow.stack.services import free_port
from visitflow.worker.zygote import RUN_PRELOAD

pytestmark = pytest.mark.e2e

FLOW = '''
import helper_{tag}
from prefect import flow, get_run_logger


@flow(persist_result=False)
def marker():
    get_run_logger().info("entrypoint=%s helper=%s", "{version}", helper_{tag}.VERSION)
'''


@pytest.fixture(scope="module")
def pools(prefect_stack, tmp_path_factory):
    env, api = prefect_stack.env, prefect_stack.api
    state = tmp_path_factory.mktemp("zygote-warm")
    code = state / "code"
    code.mkdir()
    phases = state / "phases.jsonl"
    workers = []
    tag = uuid.uuid4().hex[:8]
    try:
        for pool, warm in (("zygote-warm", "1"), ("zygote-cold", "0")):
            pstack.run_cli(["work-pool", "create", pool, "--type", "visitflow", "--overwrite"], env)
            flow = api.request("POST", "/flows/", json={"name": "marker"})
            api.request("POST", "/deployments/", json={
                "name": pool, "flow_id": flow["id"], "entrypoint": "marker_flow.py:marker", "path": str(code),
                "work_pool_name": pool, "enforce_parameter_schema": False,
                "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(code)}}]})
            workers.append(pstack.start_worker(state, env, health_port=free_port(), name=f"{pool}-worker",
                                               client_secret="unused", worker_type="visitflow", pool=pool,
                                               extra_env={"VISITFLOW_CHILD_PHASES": str(phases),
                                                          "VISITFLOW_ZYGOTE_WARM": warm}))
        for w in workers:
            w.wait_ready(timeout=180)
        yield code, phases, tag
    finally:
        for w in workers:
            w.stop()


def write_code(code: Path, tag: str, version: str) -> None:
    (code / f"helper_{tag}.py").write_text(f"VERSION = {version!r}\n")
    (code / "marker_flow.py").write_text(FLOW.format(tag=tag, version=version))


def run(api, pool: str) -> dict:
    fr = api.create_flow_run(f"marker/{pool}", {}, idempotency_key=str(uuid.uuid4()))
    done = api.wait_for_flow_run(fr["id"], timeout=180, interval=0.2)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    return done


def imported_by(phases: Path, pid: int, timeout: float = 60) -> list[str]:
    """The child's record is written as it exits, just after its final state."""
    deadline = time.monotonic() + timeout
    while True:
        if phases.exists():
            for line in phases.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("pid") == pid and "imported" in rec:
                    return rec["imported"]
        assert time.monotonic() < deadline, f"no phases record from child {pid}"
        time.sleep(0.2)


def pid_of(done: dict) -> int:
    return int(str(done["infrastructure_pid"]).split(":")[-1])


def test_a_warm_child_imports_nothing_the_zygote_warmed(prefect_stack, pools):
    code, phases, tag = pools
    write_code(code, tag, "v1")
    warm = imported_by(phases, pid_of(run(prefect_stack.api, "zygote-warm")))
    cold = imported_by(phases, pid_of(run(prefect_stack.api, "zygote-cold")))
    assert not set(RUN_PRELOAD) & set(warm), sorted(set(RUN_PRELOAD) & set(warm))
    assert "pydantic.v1" in cold, "control: without the warm zygote the child imports them itself"
    assert f"helper_{tag}" in warm, "the flow's own code is imported by the child, not the zygote"


def test_a_changed_entrypoint_and_helper_are_read_afresh(prefect_stack, pools):
    code, _, tag = pools
    api = prefect_stack.api
    for version in ("one", "second"):   # of different lengths: a .pyc keyed on (mtime s, size) cannot match
        write_code(code, tag, version)
        done = run(api, "zygote-warm")
        text = prefect_stack.logs(done["id"], wait_for=f"entrypoint={version}")
        assert f"entrypoint={version} helper={version}" in text, text[-2000:]
