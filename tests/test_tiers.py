"""The fast tier's rules and guard (tests/fixtures/tiers.py) recognise what really starts a
server here: the commands our fixtures and ``visitflow up`` run, not made-up ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.fixtures import tiers
from visitflow.stack import prefect as pstack

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PY = sys.executable   # (a literal "[sys.executable, ..." in a test would make it slow: FRESH_PYTHON)


def test_every_server_fixture_is_known_to_the_rules():
    """A fixture added to a ``*_fixtures`` module joins SERVER_FIXTURES, so its users are slow."""
    defined = set()
    for path in FIXTURES.glob("*_fixtures.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "fixture" in ast.unparse(d) for d in node.decorator_list):
                defined.add(node.name)
    assert defined, "no fixtures found: has tests/fixtures moved?"
    assert defined <= tiers.SERVER_FIXTURES, defined - tiers.SERVER_FIXTURES


def test_the_stacks_own_commands_are_servers(tmp_path):
    server = pstack.server_command(tmp_path, 4200)[0]
    worker = pstack.worker_command({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, health_port=1,
                                   client_secret="s")[0]
    cli = [PY, "-m", "visitflow.cli"]
    assert tiers.server_reason(server) == "prefect server"
    assert tiers.server_reason(worker) == "prefect worker"
    assert tiers.server_reason(cli + ["idp", "--config", "x.yaml", "--port", "1"]) == "visitflow idp"
    assert tiers.server_reason(cli + ["tiled", "serve", "--issuer", "http://i"]) == "visitflow tiled"
    assert tiers.server_reason(["visitflow", "up"]) == "visitflow up"
    assert tiers.server_reason(["/opt/opa", "run", "--server"]) == "opa run"
    assert tiers.server_reason([PY, "-m", "uvicorn", "app:app"]) == "uvicorn"
    assert tiers.server_reason("redis-server --port 1") == "redis-server"


def test_short_lived_tools_are_not_servers():
    cli = [PY, "-m", "visitflow.cli"]
    for argv in (["git", "ls-files"], cli + ["check", "flows/x.py"], cli + ["idp", "--rotate-keys", "--keys-dir", "k"],
                 cli + ["tiled-config", "--issuer", "http://i"], [PY, "-m", "prefect", "deploy", "--all"],
                 ["/opt/opa", "test", "policy"]):
        assert tiers.server_reason(argv) is None, argv
    assert tiers.spawn_reason(["sleep", "60"], {"start_new_session": True}) is not None, "how services start"


def test_the_guard_refuses_a_server_before_it_is_spawned(tmp_path):
    argv = pstack.server_command(tmp_path, 4200)[0]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    recorded = len(tiers._guard["spawned"])
    with tiers.popen_guard("this test"):
        with pytest.raises(tiers.ServerInFastTier, match="prefect server"):
            subprocess.run(argv, timeout=60)
        assert subprocess.run(["true"]).returncode == 0, "short-lived tools still run"
    assert len(tiers._guard["spawned"]) == recorded + 1
    del tiers._guard["spawned"][recorded:]    # this refusal was the point: not a failure of this test
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before, "nothing was started"


def _starts_through_a_helper(tmp):
    from tests.fixtures.idp_fixtures import start_idp

    return start_idp(tmp)


def _sample_test_starting_a_server(tmp_path):  # not collected: a sample for the rule
    _starts_through_a_helper(tmp_path)


def _sample_test_running_python():
    return subprocess.run([sys.executable, "-m", "visitflow.cli", "check"])


def _sample_pure_test():
    assert tiers.server_reason(["git"]) is None


def test_the_rules_read_a_tests_source_and_its_module_helpers():
    assert tiers._cost(_sample_test_starting_a_server) == "starts a server"
    assert tiers._cost(_sample_test_running_python) == "runs a fresh Python"
    assert tiers._cost(_sample_pure_test) is None


def test_this_run_marks_every_server_fixture_user_slow(request):
    """Whatever this run selected: no test outside the slow tier uses a server fixture."""
    fast = [i for i in request.session.items if i.get_closest_marker("slow") is None]
    assert request.node in fast, "this test is in the fast tier"
    offenders = [i.nodeid for i in fast if set(i.fixturenames) & tiers.SERVER_FIXTURES]
    assert not offenders, offenders
