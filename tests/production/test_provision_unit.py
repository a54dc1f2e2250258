"""visitflow.production.provision without servers: the session list's validation (which line,
which field), the OPA bundle's shape and determinism, and the command's refusals.  The real
servers: tests/ops/test_provision.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from visitflow.errors import ConfigError
from visitflow.production.provision import (BUNDLE_ROOTS, Report, load_sessions, parse_sessions,
                                            provision_bundle)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deployments" / "opa" / "data.json"


def shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def refusal(doc_or_text) -> str:
    text = doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text, indent=2)
    with pytest.raises(ConfigError) as info:
        parse_sessions(text, "s.json")
    return str(info.value)


def test_the_shipped_data_bundle_is_a_valid_session_list():
    sessions = load_sessions(SHIPPED)
    assert sorted(sessions.sessions) == ["a1", "a2"]
    assert sessions.sessions["a1"].proposal == "cm12345" and sessions.sessions["a1"].live_limit == 4


def test_each_kind_of_mistake_names_its_line_and_field():
    doc = shipped()
    doc["facility"]["sessions"]["a2"]["members"].append("zed")
    text = json.dumps(doc, indent=2)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"a2"' in l)
    msg = refusal(text)
    assert msg.startswith("s.json:") and "facility.sessions.a2.members[1]: 'zed' is not in facility.subjects" in msg
    assert int(msg.split(":")[1]) > line, msg   # the members line, below the session's key

    doc = shipped()
    doc["facility"]["sessions"]["a1"]["analysts"] = ["bob"]
    assert "facility.sessions.a1.analysts[0]: 'bob' is not a member of the session" in refusal(doc)

    doc = shipped()
    doc["facility"]["sessions"]["a1"]["proposal"] = "cm0"
    assert "facility.sessions.a1.proposal: 'cm0' is not in facility.proposals" in refusal(doc)

    doc = shipped()
    doc["facility"]["sessions"]["a1"]["member"] = doc["facility"]["sessions"]["a1"].pop("members")
    assert "facility.sessions.a1.member: unknown field" in refusal(doc)

    doc = shipped()
    doc["facility"]["sessions"]["a b"] = doc["facility"]["sessions"].pop("a2")
    assert "facility.sessions.a b: is not a usable visit name" in refusal(doc)

    doc = shipped()
    doc["facility"]["sessions"]["a1"]["live_limit"] = 0
    assert "facility.sessions.a1.live_limit: must be a whole number" in refusal(doc)

    doc = shipped()
    del doc["facility"]["beamlines"]
    assert 'facility: has no "beamlines"' in refusal(doc)

    assert refusal('{"facility": {\n  "sessions": {,}}}').startswith("s.json:2: not JSON:")


def test_visit_containers_follow_the_servers_layout():
    from visitflow.core.layout import Layout
    from visitflow.production.provision import visit_paths

    a1 = load_sessions(SHIPPED).sessions["a1"]
    assert visit_paths(Layout(), a1) == ["raw/a1", "processed/a1"]
    blueapi = Layout.from_templates("{instrument}/{proposal}/{visit}/{run}", None)
    assert visit_paths(blueapi, a1) == ["i22/cm12345/a1"]


def _bundle(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_the_bundle_is_data_json_and_a_manifest_byte_identical_when_nothing_changed(tmp_path):
    path = tmp_path / "bundle.tar.gz"
    sessions = load_sessions(SHIPPED)
    first = Report()
    revision = provision_bundle(path, sessions, first, say=lambda _: None)
    files = _bundle(path)
    assert set(files) == {"/.manifest", "/data.json"}
    manifest = json.loads(files["/.manifest"])
    assert manifest == {"revision": revision, "roots": list(BUNDLE_ROOTS)}
    assert json.loads(files["/data.json"])["facility"]["sessions"] == shipped()["facility"]["sessions"]
    assert first.summary() == "2 created, 0 updated, 0 removed, 0 unchanged"

    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    again = Report()
    assert provision_bundle(path, sessions, again, say=lambda _: None) == revision
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime, "not rewritten"
    assert again.summary() == "0 created, 0 updated, 0 removed, 2 unchanged"

    doc = shipped()
    del doc["facility"]["sessions"]["a2"]
    doc["facility"]["sessions"]["a1"]["analyses"] = ["saxs_average"]
    changed = Report()
    assert provision_bundle(path, parse_sessions(json.dumps(doc)), changed, say=lambda _: None) != revision
    assert changed.items == {"opa:a1": "updated", "opa:a2": "removed"}


def test_policies_ride_in_the_bundle_under_their_package_root(tmp_path):
    path = tmp_path / "bundle.tar.gz"
    policy = REPO / "deployments" / "opa" / "authz.rego"
    report = Report()
    provision_bundle(path, load_sessions(SHIPPED), report, say=lambda _: None, policies=[policy])
    files = _bundle(path)
    assert files["/authz.rego"] == policy.read_bytes()
    assert json.loads(files["/.manifest"])["roots"] == sorted([*BUNDLE_ROOTS, "visitflow/authz"])
    assert report.items["opa-policy:authz.rego"] == "created"
    from visitflow.production.provision import policy_sources

    shipped_dir = policy_sources([REPO / "deployments" / "opa"])
    assert "authz.rego" in shipped_dir and "tiled_visitflow.rego" in shipped_dir
    assert not [n for n in shipped_dir if n.endswith("_test.rego")]
    with pytest.raises(ConfigError, match="a second policy file named authz.rego"):
        policy_sources([REPO / "deployments" / "opa", policy])
    again = Report()
    provision_bundle(path, load_sessions(SHIPPED), again, say=lambda _: None)      # the policy dropped
    assert again.items["opa-policy:authz.rego"] == "removed"


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "visitflow.cli", "provision", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_command_refuses_a_bad_list_and_missing_targets_before_touching_anything(tmp_path):
    bad = tmp_path / "s.json"
    doc = shipped()
    doc["facility"]["sessions"]["a1"]["beamline"] = "i99"
    bad.write_text(json.dumps(doc, indent=2))
    proc = _cli("--sessions", str(bad), "--bundle", str(tmp_path / "b.tar.gz"))
    assert proc.returncode == 2 and "facility.sessions.a1.beamline: 'i99' is not in facility.beamlines" in proc.stderr
    assert not (tmp_path / "b.tar.gz").exists()
    proc = _cli("--sessions", str(SHIPPED), env={"PREFECT_API_URL": ""})
    assert proc.returncode == 2 and "nothing to do" in proc.stderr, proc.stderr
    proc = _cli("--sessions", str(SHIPPED), "--tiled-uri", "http://127.0.0.1:9", env={"VISITFLOW_ADMIN_SECRET": ""})
    assert proc.returncode == 2 and "Tiled needs --issuer and $VISITFLOW_ADMIN_SECRET" in proc.stderr, proc.stderr
    # a first install: the bundle before Tiled and Prefect exist; the others said skipped
    proc = _cli("--sessions", str(SHIPPED), "--bundle", str(tmp_path / "b.tar.gz"), env={"PREFECT_API_URL": ""})
    assert proc.returncode == 0, proc.stderr
    assert "tiled: skipped (no --tiled-uri)" in proc.stdout and "prefect: skipped (no --prefect-api-url)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "2 created, 0 updated, 0 removed, 0 unchanged", proc.stdout
    proc = _cli("--sessions", str(SHIPPED), "--policy", str(tmp_path / "none.rego"), "--check")
    assert proc.returncode == 2 and "none.rego: cannot read the policy file" in proc.stderr, proc.stderr
    proc = _cli("--sessions", str(SHIPPED), "--check")
    assert proc.returncode == 0 and "2 session(s), valid" in proc.stdout
