"""The warm ``visitflow`` worker type against a real Prefect server: runs flows correctly,
isolates a crashing analysis, honours cancellation, reports logs and final states."""

from pathlib import Path

import pytest

from visitflow.stack.services import free_port
from visitflow.stack import prefect as pstack

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parents[1] / "fixtures"  # warm_flows.py


@pytest.fixture(scope="module")
def warm(prefect_stack, tmp_path_factory):
    env = prefect_stack.env
    pstack.run_cli(["work-pool", "create", "warm-tests", "--type", "visitflow", "--overwrite"], env)
    api = prefect_stack.api
    for name in ("hello", "crash", "sleepy"):
        flow = api.request("POST", "/flows/", json={"name": name})
        api.request("POST", "/deployments/", json={
            "name": "warm", "flow_id": flow["id"], "entrypoint": f"warm_flows.py:{name}", "path": str(HERE),
            "work_pool_name": "warm-tests", "enforce_parameter_schema": False,
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(HERE)}}]})
    state = tmp_path_factory.mktemp("warm")
    worker = pstack.start_worker(state, env, health_port=free_port(), name="warm-tests-worker",
                                 client_secret="unused", worker_type="visitflow", pool="warm-tests")
    worker.wait_ready(timeout=120)
    yield worker
    worker.stop()


def run(api, name, params=None, key=None, timeout=120):
    import uuid

    fr = api.create_flow_run(f"{name}/warm", params or {}, idempotency_key=key or str(uuid.uuid4()))
    return fr, api.wait_for_flow_run(fr["id"], timeout=timeout, interval=0.2)


def test_runs_a_flow_and_reports_logs(prefect_stack, warm):
    api = prefect_stack.api
    _, done = run(api, "hello", {"x": 21})
    assert done["state"]["type"] == "COMPLETED"
    assert done["infrastructure_pid"], "the forked child's pid is recorded for cancellation"
    assert "x=21" in prefect_stack.logs(done["id"], wait_for="x=21")


def test_crash_is_isolated(prefect_stack, warm):
    api = prefect_stack.api
    _, crashed = run(api, "crash")
    assert crashed["state"]["type"] == "CRASHED"
    assert "17" in crashed["state"]["message"]
    assert warm.process.poll() is None, "the worker survived"
    _, after = run(api, "hello")
    assert after["state"]["type"] == "COMPLETED", "and still runs flows"


def test_cancellation(prefect_stack, warm):
    import time

    api = prefect_stack.api
    fr = api.create_flow_run("sleepy/warm", {"seconds": 120}, idempotency_key=f"sleepy-{time.time()}")
    deadline = time.monotonic() + 60
    while api.flow_run(fr["id"])["state"]["type"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pid = int(api.flow_run(fr["id"])["infrastructure_pid"].split(":")[-1])
    api.request("POST", f"/flow_runs/{fr['id']}/set_state",
                json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    done = api.wait_for_flow_run(fr["id"], timeout=60, interval=0.2)
    assert done["state"]["type"] == "CANCELLED"
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child (and its process group) is gone


def _zygotes_of(worker_pid: int) -> list[int]:
    """Live zygote processes whose parent is the worker (from /proc: no private state)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            state, ppid = fields[0], fields[1]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(ppid) == worker_pid and state not in ("Z", "X") and "visitflow.worker.zygote" in cmdline:
            out.append(int(proc.name))
    return out


def test_a_killed_zygote_is_restarted_for_the_next_run(prefect_stack, warm):
    """The zygote killed (OOM killer, an operator): the worker starts a new one and runs on."""
    import os
    import signal
    import time

    (old,) = _zygotes_of(warm.pid)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while old in _zygotes_of(warm.pid):   # SIGKILL is delivered asynchronously
        assert time.monotonic() < deadline, "the zygote survived SIGKILL"
        time.sleep(0.1)
    _, done = run(prefect_stack.api, "hello", {"x": 5}, timeout=300)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    assert "x=5" in prefect_stack.logs(done["id"], wait_for="x=5")
    (new,) = _zygotes_of(warm.pid)
    assert new != old
    assert "visitflow zygote died; restarting it" in warm.log_path.read_text(errors="replace")
    assert warm.process.poll() is None, "the worker survived"
