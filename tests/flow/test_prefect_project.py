"""prefect.yaml and flows/ agree: every @analysis has a live and a post deployment, and no
deployment passes parameters or secrets."""

from pathlib import Path

import yaml

from visitflow.flow.testing import load_analyses

REPO = Path(__file__).resolve().parents[2]


def analyses_in_flows():
    return {f"flows/{path.name}:{name}": obj
            for path in sorted((REPO / "flows").glob("*.py")) for name, obj in load_analyses(path).items()}


def test_every_analysis_has_live_and_post():
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployed = {(d["entrypoint"], d["name"]) for d in project["deployments"]}
    flows = analyses_in_flows()
    assert {"flows/saxs_average.py:saxs_average", "flows/peak_stats.py:peak_stats"} <= set(flows)
    for entrypoint in flows:
        assert {(entrypoint, "live"), (entrypoint, "post")} <= deployed, entrypoint
    assert {e for e, _ in deployed} <= set(flows), "a deployment points at something that is not an analysis"


def test_deployments_carry_no_parameters_or_secrets():
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert project["deployments"], "prefect.yaml deploys nothing"
    for d in project["deployments"]:
        assert not d.get("parameters"), d["name"]
        env = d["work_pool"]["job_variables"]["env"]
        assert not any("SECRET" in k or "TOKEN" in k for k in env), env
        assert d["work_pool"]["work_queue_name"] == d["name"]
