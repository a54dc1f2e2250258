"""The README's first commands, run as a user runs them: ``visitflow up``, ``status``, ``demo``
and ``down`` -- the console script in a subprocess, on a state directory of its own and free
ports (so it collides neither with a developer's stack on the default ports nor with the
test session's servers).

Why: nothing else runs these commands, yet they are what a new user meets first.  Each test
asserts on what the command prints and on what it leaves running, checked independently of
the command (health URLs, Prefect's API, the processes themselves).  One stack serves the
module; ``down`` is tested last and the fixture stops whatever is left either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures.console import group_running, run_visitflow
from visitflow.stack.services import free_port, stop_group

# Start-up of four servers plus `prefect deploy --all` on a loaded 2-core machine, then a demo:
# well past the suite's default 600 s per test.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


@dataclass
class UserStack:
    """A stack brought up by ``visitflow up`` in ``state`` on ``ports``."""

    state: Path
    ports: dict[str, int]
    up_output: str

    def flags(self, *, ports: bool = True) -> list[str]:
        out = ["--state-dir", str(self.state)]
        if ports:
            for name, port in self.ports.items():
                out += [f"--{name}-port", str(port)]
        return out

    def record(self) -> dict:
        return json.loads((self.state / "stack.json").read_text())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


def parse_status(text: str) -> dict[str, tuple[str, str]]:
    """``visitflow status`` rows: name -> (state, health URL)."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith("http"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def user_stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("visitflow-state")
    ports = {"idp": free_port(), "tiled": free_port(), "prefect": free_port(), "worker-health": free_port()}
    stack = UserStack(state, ports, "")
    try:
        proc = run_visitflow("up", *stack.flags(), "--no-ui", timeout=1500)
        stack.up_output = proc.stdout
        assert proc.returncode == 0, proc.stdout[-4000:]
        yield stack
    finally:
        down = run_visitflow("down", *stack.flags(ports=False), timeout=300)
        leftover = {}
        if (state / "stack.json").exists():
            leftover = stack.record().get("services", {})
        for info in leftover.values():   # `down` failed or was not reached: stop what is left
            stop_group(info["pid"])
        assert down.returncode == 0, down.stdout[-4000:]


def test_up_prints_where_each_service_runs(user_stack):
    out = user_stack.up_output
    assert f"visitflow is up (state in {user_stack.state.resolve()})" in out, out
    assert f"IdP          {user_stack.url('idp')}\n" in out, out
    assert f"Tiled        {user_stack.url('tiled')}\n" in out, out
    auth_file = user_stack.state.resolve() / "prefect-auth"
    assert f"Prefect UI   {user_stack.url('prefect')}   (its login asks for the auth string: cat {auth_file})\n" \
        in out, out
    assert f"Prefect API  {user_stack.url('prefect')}/api   (needs it too: export PREFECT_API_AUTH_STRING=" \
           f"$(cat {auth_file}))\n" in out, out
    assert "next: visitflow demo   |   visitflow down" in out, out
    for name in ("idp", "tiled", "prefect-server", "worker"):
        assert re.search(rf"\[visitflow\] {name}: started in [0-9.]+s \(pid \d+, log .+{name}\.log\)", out), (name, out)
    # what it left running answers where it said
    assert answers(f"{user_stack.url('idp')}/health")
    assert answers(f"{user_stack.url('prefect')}/api/health")
    assert answers(f"{user_stack.url('worker-health')}/health")


def test_up_guards_prefect_with_the_stacks_auth_string(user_stack):
    """Issue 20 finding 3: the local Prefect API was open to every local user (pending grants in
    clear).  Now it needs the auth string ``up`` generated, readable by its owner only."""
    auth_file = user_stack.state / "prefect-auth"
    assert auth_file.stat().st_mode & 0o777 == 0o600
    auth = auth_file.read_text().strip()
    assert auth.startswith("visitflow:") and len(auth) > 30
    api = f"{user_stack.url('prefect')}/api"
    query = {"block_types": {"slug": {"any_": ["secret"]}}, "include_secrets": True}
    anonymous = httpx.post(f"{api}/block_documents/filter", json=query, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    wrong = httpx.post(f"{api}/block_documents/filter", json=query, auth=("visitflow", "guess"), timeout=30)
    assert wrong.status_code == 401, wrong.text
    user, password = auth.split(":", 1)
    assert httpx.post(f"{api}/block_documents/filter", json=query, auth=(user, password),
                      timeout=30).status_code == 200


def test_up_makes_each_visits_live_limit_with_provisions_code(user_stack):
    """``up`` and ``visitflow provision`` share one owner of the ``visitflow-live-<visit>``
    limits (visitflow.production.provision): the stack's visits get theirs at 4 slots."""
    user, password = (user_stack.state / "prefect-auth").read_text().strip().split(":", 1)
    r = httpx.post(f"{user_stack.url('prefect')}/api/v2/concurrency_limits/filter", json={"limit": 200},
                   auth=(user, password), timeout=30)
    assert r.status_code == 200, r.text
    limits = {item["name"]: item["limit"] for item in r.json() if item["name"].startswith("visitflow-live-")}
    assert limits == {"visitflow-live-a1": 4, "visitflow-live-a2": 4}


def test_status_says_what_runs_where(user_stack):
    proc = run_visitflow("status", *user_stack.flags(ports=False), timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert parse_status(proc.stdout) == {
        "idp": ("healthy", f"{user_stack.url('idp')}/health"),
        "tiled": ("healthy", f"{user_stack.url('tiled')}/api/v1/"),
        "prefect-server": ("healthy", f"{user_stack.url('prefect')}/api/health"),
        "worker": ("healthy", f"{user_stack.url('worker-health')}/health"),
    }, proc.stdout


def test_up_again_reuses_the_running_stack(user_stack):
    before = {name: info["pid"] for name, info in user_stack.record()["services"].items()}
    proc = run_visitflow("up", *user_stack.flags(), "--no-ui", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for name in ("idp", "tiled", "prefect-server", "worker"):
        assert f"[visitflow] {name}: already running" in proc.stdout, (name, proc.stdout)
    assert "started in" not in proc.stdout and "tiled: created" not in proc.stdout, proc.stdout
    assert {name: info["pid"] for name, info in user_stack.record()["services"].items()} == before


def test_demo_runs_the_story_and_says_where_to_look(user_stack):
    from visitflow.core import oauth
    from visitflow.core.prefect_api import PrefectAPI
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.flow.sink import read_result

    frames = 12
    proc = run_visitflow("demo", *user_stack.flags(), "--no-ui", "--frames", str(frames), "--delay", "0.05",
                         "--timeout", "600", timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    (uid,) = re.findall(r"\[visitflow\] alice: scan (\S+) finished in", out)
    prefect, tiled = user_stack.url("prefect"), user_stack.url("tiled")

    # the four flow runs the trigger started, each said COMPLETED with its link in the UI ...
    runs = dict(((m[0], m[1]), m[2]) for m in re.findall(
        rf"\[visitflow\] (saxs-average|peak-stats)/(live|post) a1 {uid[:8]}: COMPLETED  -> "
        rf"{re.escape(prefect)}/runs/flow-run/([0-9a-f-]+)", out))
    assert set(runs) == {(f, v) for f in ("saxs-average", "peak-stats") for v in ("live", "post")}, out
    # ... and Prefect agrees
    with PrefectAPI(f"{prefect}/api", (user_stack.state / "prefect-auth").read_text().strip()) as api:
        for flow_run_id in runs.values():
            fr = api.flow_run(flow_run_id)
            assert fr["state"]["type"] == "COMPLETED" and f"run:{uid}" in fr["tags"], fr

    # the results it printed are in Tiled, readable by Alice
    assert "[visitflow] result saxs_average (" in out and "[visitflow] result peak_stats (" in out, out
    login = oauth.password_login(oauth.token_endpoint(user_stack.url("idp")), "alice", "alice")
    alice = connect(tiled, BearerAuth(lambda: (login.access_token, login.expires_at)))
    assert read_result(alice[f"processed/a1/{uid}/peak_stats"])["frames"] == frames
    assert read_result(alice[f"processed/a1/{uid}/saxs_average"])["average"].shape == (64, 64)

    # the refusals: Carol's analyses, after her scan; Bob's view and his delegation
    carol = out.index("[visitflow] carol (member of a1, without run:* scopes) scans")
    assert re.search(r"\[visitflow\]   REFUSED (saxs_average|peak_stats) for visit a1 run \S+: the IdP says",
                     out[carol:]), out[carol:]
    assert "[visitflow] bob (visit a2) lists raw/: ['a2'] — a1 is not even visible" in out, out
    assert "[visitflow] bob asks to analyse alice's run: refused by the IdP (" in out, out
    assert "UNEXPECTEDLY" not in out, out

    # where to look
    assert f"[visitflow]   Prefect UI  {prefect}/runs   (flow runs" in out, out
    assert f"[visitflow]   Tiled       {tiled}/api/v1/metadata/processed/a1/{uid}  (Bearer token needed)" in out, out
    assert "[visitflow]   stop everything: visitflow down" in out, out

    # and the stack stays up for the user to look
    status = run_visitflow("status", *user_stack.flags(ports=False), timeout=120)
    assert status.returncode == 0 and {s for s, _ in parse_status(status.stdout).values()} == {"healthy"}, status.stdout


def test_down_stops_what_up_started(user_stack):
    """Last in the module: the stack is gone afterwards."""
    started = {name: info for name, info in user_stack.record()["services"].items()}
    assert set(started) == {"idp", "tiled", "prefect-server", "worker"}
    proc = run_visitflow("down", *user_stack.flags(ports=False), timeout=300)
    assert proc.returncode == 0, proc.stdout
    for name, info in started.items():
        assert f"[visitflow] {name}: stopped (pid {info['pid']})" in proc.stdout, (name, proc.stdout)
        assert not group_running(info["pid"]), f"{name}'s process group {info['pid']} still runs"
        assert not answers(info["health"]), f"{name} still answers {info['health']}"
    assert user_stack.record()["services"] == {}

    status = run_visitflow("status", *user_stack.flags(ports=False), timeout=120)
    assert status.returncode == 1
    assert "nothing started from this state directory (visitflow up)" in status.stdout, status.stdout
