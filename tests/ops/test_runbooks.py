"""docs/operations.md's runbooks: each ``runbook:<name>`` block run by bash, as written,
against this suite's real servers (the stuck-live-run and upgrade blocks need Prefect and
run in tests/ops/test_story.py, staff-recovery in tests/ops/test_staff_recovery.py, provision in
tests/ops/test_provision.py).  What the doc says no test runs is listed there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.ci import missing_part
from tests.fixtures.federation_fixtures import TS_ENV, TS_SECRETS, _spawn, start_token_service
from tests.fixtures.opa_fixtures import start_opa
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.ops

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operations.md"
GRANT_SCOPE = "run:saxs_average:a1 read:raw:a1/{run} write:processed:a1/{run}"


def runbook(name: str) -> str:
    blocks = dict(re.findall(r"```bash runbook:([\w-]+)\n(.*?)```", DOC.read_text(), re.S))
    assert name in blocks, f"docs/operations.md has no runbook:{name} block (has {sorted(blocks)})"
    return blocks[name]


def run_runbook(name: str, env: dict, expect_ok: bool = True) -> str:
    """Run the block in bash (``set -euo pipefail``) with ``env``; the venv's ``visitflow``
    and ``prefect`` first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + runbook(name)], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **{k: str(v) for k, v in env.items()}}, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, f"runbook:{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_runbook_in_the_doc_is_walked_by_a_test():
    walked = set(re.findall(r'run_runbook\("([\w-]+)"', Path(__file__).read_text()))
    for other in sorted(Path(__file__).parent.glob("test_*.py")):   # every ops test file may walk one
        walked |= set(re.findall(r'run_runbook\("([\w-]+)"', other.read_text()))
    walked |= set(re.findall(r'run_runbook\("([\w-]+)"',     # live-fence: walked on the HA topology
                             (Path(__file__).parents[1] / "production" / "test_ha.py").read_text()))
    assert walked == set(re.findall(r"```bash runbook:([\w-]+)", DOC.read_text()))


@pytest.fixture
def own_token_service(tmp_path, ops_idp):
    """A token service with its own OPA (the tests stop it)."""
    opa = start_opa(tmp_path / "opa")
    ts = start_token_service(tmp_path / "ts", ops_idp.issuer, opa.direct_url)
    yield ts, opa
    ts.service.stop()
    opa.service.stop()


def test_idp_and_opa_outage_runbooks_show_which_dependency(tmp_path, ops_idp, own_token_service):
    ts, opa = own_token_service
    env = {"TS": ts.issuer, "OPA": opa.direct_url}
    assert run_runbook("idp-outage", env).splitlines() == ["ready []", "200"]
    out = run_runbook("opa-outage", env)
    assert out.splitlines()[0] == "ready []" and "opa health 200" in out
    alice = ops_idp.token("alice")
    assert ts.exchange_response(alice, "blueapi", audience="visitflow",
                                scope=GRANT_SCOPE.format(run=uuid.uuid4().hex)).status_code == 200
    opa.service.stop()
    assert ts.exchange_response(alice, "blueapi", audience="visitflow",
                                scope=GRANT_SCOPE.format(run=uuid.uuid4().hex)).status_code == 503
    out = run_runbook("opa-outage", env)
    assert out.splitlines()[0] == "not ready ['authority']", out
    assert "opa health 000" in out
    assert re.search(r'visitflow_authority_queries_total\{kind="opa",ok="false"\} [1-9]', out), out


def test_key_rotation_runbook_keeps_old_tokens_valid(tmp_path, ops_idp, own_token_service):
    ts, _ = own_token_service
    run = uuid.uuid4().hex
    grant = ts.exchange(ops_idp.token("alice"), "blueapi", audience="visitflow",
                        scope=GRANT_SCOPE.format(run=run))["access_token"]
    out = run_runbook("key-rotation", {"TS": ts.issuer, "STATE": ts.state_dir})
    assert out.splitlines()[-1] == "2 keys published", out
    # signed before the rotation: still accepted (T_grant -> T_data); signed after: with the new key
    data = ts.exchange(grant, "visitflow", audience="tiled", scope=f"read:raw:a1/{run} write:processed:a1/{run}")
    import jwt

    assert jwt.get_unverified_header(data["access_token"])["kid"] != jwt.get_unverified_header(grant)["kid"]


def test_leaked_secret_runbook_old_secret_refused_and_token_revoked(tmp_path, ops_idp, own_token_service,
                                                                    monkeypatch):
    ts, _ = own_token_service
    grant = ts.exchange(ops_idp.token("alice"), "blueapi", audience="visitflow",
                        scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))["access_token"]
    old = TS_SECRETS["visitflow"]
    monkeypatch.setitem(TS_ENV, "VISITFLOW_VISITFLOW_SECRET", "rotated-" + uuid.uuid4().hex)
    ts.restart()          # the token service with the new secret, state (keys, revocations) kept
    out = run_runbook("leaked-secret", {"TS": ts.issuer, "OLD_SECRET": old, "TILED_SECRET": TS_SECRETS["tiled"],
                                        "LEAKED_TOKEN": grant})
    assert out.splitlines()[0] == "old secret: 401", out
    assert out.splitlines()[-1] == '{"active":false}', out


def test_token_service_backup_and_restore_runbooks_keep_revocations(tmp_path, ops_idp, own_token_service):
    ts, _ = own_token_service
    grant = ts.exchange(ops_idp.token("alice"), "blueapi", audience="visitflow",
                        scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))["access_token"]
    assert ts.revoke(grant).status_code == 200
    backup, restored = tmp_path / "backup", tmp_path / "restored"
    backup.mkdir()
    run_runbook("backup-token-service", {"STATE": ts.state_dir, "BACKUP": backup})
    ts.service.stop()
    import shutil

    shutil.rmtree(ts.state_dir)                           # the disk is lost
    run_runbook("restore-token-service", {"BACKUP": backup, "RESTORED": ts.state_dir})
    ts.service = _spawn(ts.config_path, ts.state_dir, ts.port)
    ts.service.wait_ready(timeout=60)
    import httpx

    r = httpx.post(f"{ts.issuer}/introspect", data={"token": grant}, auth=("tiled", TS_SECRETS["tiled"]), timeout=10)
    assert r.json() == {"active": False}, "the revocation survived the restore"
    fresh = ts.exchange(ops_idp.token("alice"), "blueapi", audience="visitflow",
                        scope=GRANT_SCOPE.format(run=uuid.uuid4().hex))["access_token"]
    r = httpx.post(f"{ts.issuer}/introspect", data={"token": fresh}, auth=("tiled", TS_SECRETS["tiled"]), timeout=10)
    assert r.json()["active"] is True, "the restored signing key signs and validates"


def test_outbox_backup_runbook_copies_a_live_outbox(tmp_path, ops_idp):
    from visitflow.trigger import AnalysisTrigger, TriggerSettings
    from visitflow.trigger.outbox import Outbox

    trig = AnalysisTrigger(TriggerSettings(issuer=ops_idp.issuer, prefect_api_url="http://127.0.0.1:9/api",
                                           client_secret="blueapi-dev-secret", state_dir=tmp_path / "trigger",
                                           max_backoff=1.0), token=ops_idp.token("alice"))
    try:
        trig.request("saxs_average", "a1", "r-backup")
        wait_until(lambda: trig.outbox.grant("saxs_average", "a1", "r-backup").state == "store", timeout=60,
                   what="a grant waiting in the outbox")
        backup = tmp_path / "backup"
        backup.mkdir()
        run_runbook("backup-outbox", {"OUTBOX": trig.outbox.path, "BACKUP": backup})   # while it runs
    finally:
        trig.close()
    copy = Outbox(backup / "outbox.sqlite")
    assert copy.grant("saxs_average", "a1", "r-backup").state == "store"
    assert copy.depth() == {"grant:store": 1, "request:pending": 1}
    copy.close()


def test_postgres_backup_runbook(tmp_path):
    url = os.environ.get("VISITFLOW_TEST_POSTGRES_URL")
    if not url:
        missing_part("VISITFLOW_TEST_POSTGRES_URL is not set (.ci/run starts a throwaway cluster)")
    backup = tmp_path / "backup"
    backup.mkdir()
    out = run_runbook("backup-postgres", {"BACKUP": backup, "DATABASE_URL": url})
    assert out.strip() == "dump readable"
