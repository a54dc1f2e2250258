"""`visitflow new-analysis`: the skeleton, its deployments and its test — the test passes
unchanged, the result deploys, and on the real stack the trigger runs it live and post."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from visitflow.core import names as grants
from visitflow.errors import AnalysisDefinitionError
from visitflow.flow.testing import assert_check, load_analyses

pytestmark = pytest.mark.analysts

REPO = Path(__file__).resolve().parents[2]


def project(tmp_path) -> Path:
    """A copy of this project's flows and prefect.yaml (the scaffold edits them)."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    return root


def scaffold(root, *args):
    return subprocess.run([sys.executable, "-m", "visitflow.cli", "new-analysis", *args, "--root", str(root)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("incremental", [False, True])
def test_scaffold_writes_a_flow_deployments_and_a_passing_test(tmp_path, incremental):
    root = project(tmp_path)
    before = (root / "prefect.yaml").read_text()
    out = scaffold(root, "roi_mean", "--reads", "det,saxs", *(["--incremental"] if incremental else []))
    assert out.returncode == 0, out.stderr
    flow = load_analyses(root / "flows/roi_mean.py")["roi_mean"]
    assert flow.spec.reads == ("det", "saxs") and (flow.spec.incremental is not None) == incremental
    assert flow.spec.description and "visitflow check flows/roi_mean.py" in (root / "flows/roi_mean.py").read_text()
    assert_check(flow, shapes={"saxs": (4, 3)})
    # prefect.yaml: the old text untouched (comments, anchors), two deployments added.
    after = (root / "prefect.yaml").read_text()
    assert after.startswith(before.rstrip("\n"))
    deployed = {(d["entrypoint"], d["name"]): d for d in yaml.safe_load(after)["deployments"]}
    for variant in ("live", "post"):
        d = deployed[("flows/roi_mean.py:roi_mean", variant)]
        assert d["work_pool"]["work_queue_name"] == variant and not d.get("parameters")
    # The generated test passes as written.
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_roi_mean.py"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0 and "2 passed" in test.stdout, test.stdout + test.stderr
    # And the server-free check agrees.
    check = subprocess.run([sys.executable, "-m", "visitflow.cli", "check", "flows/roi_mean.py"], cwd=root,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    # Running it again changes nothing in prefect.yaml and refuses to overwrite the flow.
    again = scaffold(root, "roi_mean", "--reads", "det,saxs")
    assert again.returncode == 1 and "exists" in again.stderr and (root / "prefect.yaml").read_text() == after


@pytest.mark.parametrize("args,match", [
    (["Bad-Name", "--reads", "det"], "lower-case Python identifier"),
    (["ok_name", "--reads", "det,det"], "distinct field names"),
    (["ok_name", "--reads", "a b"], "distinct field names"),
    (["det", "--reads", "det"], "name of a field"),
])
def test_scaffold_refuses_bad_names(tmp_path, args, match):
    root = project(tmp_path)
    out = scaffold(root, *args)
    assert out.returncode == 1 and match in out.stderr, out.stderr
    assert not (root / "tests").exists()


def test_the_project_test_sees_every_analysis_deployed(tmp_path):
    from visitflow.flow.scaffold import new_analysis

    root = project(tmp_path)
    new_analysis(root, "edge_mean", ["det"], incremental=True)
    project_yaml = yaml.safe_load((root / "prefect.yaml").read_text())
    deployed = {(d["entrypoint"], d["name"]) for d in project_yaml["deployments"]}
    analyses = [(path, name) for path in sorted((root / "flows").glob("*.py")) for name in load_analyses(path)]
    assert ("edge_mean.py", "edge_mean") in {(p.name, n) for p, n in analyses}, analyses
    for path, name in analyses:
        assert {(f"flows/{path.name}:{name}", v) for v in ("live", "post")} <= deployed
    with pytest.raises(AnalysisDefinitionError):
        new_analysis(root, "x", [])


@pytest.mark.e2e
def test_scaffold_deploy_trigger_both_variants_complete(tmp_path, idp, tiled_server, prefect_stack):
    from visitflow.stack import prefect as pstack
    from visitflow.flow.sink import read_result
    from visitflow.trigger import AnalysisTrigger
    from visitflow.trigger.plans import uses_analyses

    from tests.fixtures.scans import run_scan, user_root
    from tests.trigger.test_trigger import settings_for

    root = project(tmp_path)
    name = "scaffolded_mean"
    assert scaffold(root, name, "--reads", "det,motor", "--incremental").returncode == 0
    flow = grants.flow_name(name)
    pstack.run_cli(["--no-prompt", "deploy", "--name", f"{flow}/live", "--name", f"{flow}/post"],
                   {**prefect_stack.env, "VISITFLOW_ROOT": str(root)}, cwd=root)

    def plan(det, saxs, motor, md):
        import bluesky.plans as bp

        @uses_analyses(name)
        def scan():
            return (yield from bp.scan([det, saxs], motor, -2, 2, 10, md=md))

        return scan()

    # bob may start any analysis on his visit a2 (run:*:a2); alice's roles name the shipped ones.
    token = idp.token("bob")
    trig = AnalysisTrigger(settings_for(tmp_path, idp.issuer, prefect_stack.api_url), token=token)
    uid = run_scan(tiled_server.uri, token, visit="a2", plan=plan, subscribers=[trig])
    assert trig.flush(60), [(r.key, r.state, r.error) for r in trig.outbox.requests()]
    trig.close()
    assert any(d.startswith(f"created {name}/live/a2/") for d in trig.decisions), trig.decisions
    runs = prefect_stack.api.flow_runs(tags=[f"run:{uid}"])
    assert sorted(r["name"].split()[0] for r in runs) == [f"{flow}/live", f"{flow}/post"]
    for r in runs:
        done = prefect_stack.api.wait_for_flow_run(r["id"], timeout=300)
        assert done["state"]["type"] == "COMPLETED", prefect_stack.logs(r["id"])
    bob = user_root(tiled_server.uri, idp.token("bob"))
    node = bob[f"processed/a2/{uid}/{name}"]
    raw = bob[f"raw/a2/{uid}/primary"]
    got = read_result(node)
    assert node.metadata["current"].startswith("post-") and node["live"].metadata["status"] == "complete"
    for field in ("det", "motor"):
        np.testing.assert_allclose(got[f"{field}_mean"], np.mean(raw[field].read()), rtol=1e-12)
        np.testing.assert_allclose(node["live"].metadata["scalars"][f"{field}_mean"], np.mean(raw[field].read()),
                                   rtol=1e-12)
