"""The Kubernetes work pool files: rendered through prefect-kubernetes' own code, validated
against the Kubernetes OpenAPI schema (kubernetes-validate, strict, offline), and checked for
secret hygiene with planted secret values.

No cluster and no Prefect server are needed: the Job is what ``KubernetesWorkerJobConfiguration``
builds for a real ``FlowRun``/``Deployment``/``Flow``, and the last step is the worker's own
``_create_job`` with the Kubernetes client replaced by a recorder of what it would submit.
The Prefect API URL points at a closed port, so any accidental API call fails loudly.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from visitflow.production import kubernetes as k8s
from visitflow.production.prefect_yaml import retarget

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deployments" / "kubernetes"
#: Oldest and newest Kubernetes minors we claim; kubernetes-validate 1.37 ships both schemas.
K8S_VERSIONS = ("1.30.0", "1.37.0")
#: Fields prefect-kubernetes 0.8.0 requires under the pod spec, where Kubernetes has no such fields.
UPSTREAM_POD_SPEC_QUIRK = ("parallelism", "completions")

PLANTED_AUTH = "planted-auth-" + uuid.uuid4().hex
PLANTED_KEY = "planted-key-" + uuid.uuid4().hex
PLANTED_CLIENT = "planted-client-" + uuid.uuid4().hex
PLANTED = (PLANTED_AUTH, PLANTED_KEY, PLANTED_CLIENT)
IMAGE = "registry.example.org/visitflow-flows:0.1.0"


# ------------------------------------------------------------------------------ helpers


def load_template() -> dict:
    return json.loads((K8S_DIR / "base-job-template.json").read_text())


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S_DIR / name).read_text()) if d]


def validate_strict(manifest: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def validate_job(manifest: dict) -> None:
    """Strictly valid once the known upstream quirk is removed; the quirk is the only
    difference from the non-strict schema (which ignores unknown fields as the API server
    does with its default ``fieldValidation=Warn``)."""
    pod_spec = manifest["spec"]["template"]["spec"]
    assert all(pod_spec.get(k) == 1 for k in UPSTREAM_POD_SPEC_QUIRK), "upstream quirk changed: re-check"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=False)
        with pytest.raises(kubernetes_validate.ValidationError, match="parallelism|completions"):
            kubernetes_validate.validate(manifest, version, strict=True)
    stripped = copy.deepcopy(manifest)
    for k in UPSTREAM_POD_SPEC_QUIRK:
        stripped["spec"]["template"]["spec"].pop(k)
    validate_strict(stripped)


def env_by_name(manifest: dict) -> dict[str, dict]:
    entries = k8s.container_env(manifest)
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e for e in entries}


def api_objects(job_variables: dict | None = None):
    """Real Prefect API schema objects for one flow run of ``saxs-average/post``."""
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.client.schemas.responses import DeploymentResponse

    flow = Flow(name="saxs-average")
    deployment = DeploymentResponse(
        name="post", flow_id=flow.id, work_pool_name=k8s.POOL_NAME, work_queue_name="post",
        entrypoint="flows/saxs_average.py:saxs_average",
        job_variables=job_variables if job_variables is not None else {
            "image": IMAGE, "env": {"VISITFLOW_CREDENTIALS_BLOCK": "visitflow"},
            "cpu_request": "250m", "memory_limit": "3Gi", "finished_job_ttl": 600,
        },
    )
    flow_run = FlowRun(
        flow_id=flow.id, deployment_id=deployment.id, name="quiet-heron",
        parameters={"visit": "a1", "run_id": "r1"},
    )
    return flow, deployment, flow_run


@pytest.fixture
def worker_settings(monkeypatch):
    """A worker whose own environment holds secrets (as a real one does)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("VISITFLOW_CLIENT_SECRET", PLANTED_CLIENT)
    with temporary_settings({
        PREFECT_API_URL: "http://127.0.0.1:9/api",  # discard port: any API call would fail
        PREFECT_API_AUTH_STRING: PLANTED_AUTH,
        PREFECT_API_KEY: PLANTED_KEY,
    }):
        yield


def render(template: dict, job_variables: dict | None = None) -> tuple[dict, object]:
    flow, deployment, flow_run = api_objects(job_variables)
    values = {**deployment.job_variables, **(flow_run.job_variables or {})}  # as the worker merges them
    manifest = asyncio.run(k8s.render_job_manifest(template, values, flow_run, deployment, flow))
    return manifest, flow_run


class RecordingBatchApi:
    """Stands in for kubernetes_asyncio's BatchV1Api: records the Job the worker submits."""

    submitted: list = []

    def __init__(self, api_client=None):
        pass

    async def create_namespaced_job(self, namespace, body, **kwargs):
        from kubernetes_asyncio.client.models import V1Job, V1ObjectMeta

        RecordingBatchApi.submitted.append((namespace, copy.deepcopy(body)))
        return V1Job(metadata=V1ObjectMeta(name=body["metadata"]["generateName"] + "x", namespace=namespace))


def submit_through_worker(template: dict, monkeypatch, auth_secret_settings: bool) -> dict:
    """Run prefect-kubernetes' KubernetesWorker._create_job and return the Job it submits."""
    import prefect_kubernetes.worker as pkw
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    if auth_secret_settings:  # what deployments/kubernetes/base/worker.yaml sets
        worker_env = {e["name"]: e.get("value") for e in worker_container()["env"]}
        for name in ("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME",
                     "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"):
            monkeypatch.setenv(name, worker_env[name])
    monkeypatch.setattr(pkw, "BatchV1Api", RecordingBatchApi)
    RecordingBatchApi.submitted = []
    flow, deployment, flow_run = api_objects()

    async def go():
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, {**deployment.job_variables})
        config.prepare_for_flow_run(flow_run, deployment, flow)
        worker = KubernetesWorker(work_pool_name=k8s.POOL_NAME)
        await worker._create_job(config, client=None)

    asyncio.run(go())
    ((namespace, body),) = RecordingBatchApi.submitted
    assert namespace == body["metadata"]["namespace"]
    return body


def worker_container() -> dict:
    (deployment,) = [d for d in docs("base/worker.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# ------------------------------------------------------------------------ the template


def test_shipped_template_is_the_generated_one():
    """After a prefect-kubernetes upgrade this fails: regenerate, then read the diff."""
    assert load_template() == k8s.build_base_job_template(), (
        "deployments/kubernetes/base-job-template.json is stale: "
        "python -m visitflow.production.kubernetes > deployments/kubernetes/base-job-template.json")


def test_template_keeps_upstream_shape_and_fixes_the_secret_names():
    from prefect_kubernetes.worker import KubernetesWorker

    upstream = KubernetesWorker.get_default_base_job_template()
    ours = load_template()
    assert set(upstream["variables"]["properties"]) - {"backoff_limit"} <= set(ours["variables"]["properties"])
    assert ours["job_configuration"]["job_manifest"]["spec"]["backoffLimit"] == 0
    assert "backoff_limit" not in ours["variables"]["properties"]
    # secrets are not variables: nothing a deployment sets can redirect a secretKeyRef
    assert not any("secret" in name for name in ours["variables"]["properties"])
    text = json.dumps(ours)
    for secret, key in k8s.SECRET_ENV.values():
        assert text.count(f'"name": "{secret}"') == 1


def test_rendered_job_is_valid_kubernetes_and_carries_the_run(worker_settings):
    manifest, flow_run = render(load_template())
    validate_job(manifest)
    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = env_by_name(manifest)

    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)
    assert manifest["metadata"]["labels"]["prefect.io/flow-run-id"] == str(flow_run.id)
    assert manifest["metadata"]["namespace"] == k8s.NAMESPACE
    assert spec["ttlSecondsAfterFinished"] == 600                 # the deployment's override
    assert spec["activeDeadlineSeconds"] == k8s.ACTIVE_DEADLINE_DEFAULT
    assert spec["backoffLimit"] == 0
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"  # prefect's eviction handling
    assert pod["serviceAccountName"] == k8s.FLOW_SERVICE_ACCOUNT
    assert pod["automountServiceAccountToken"] is False
    assert container["image"] == IMAGE
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "1Gi"},                # cpu overridden, memory default
        "limits": {"cpu": "2", "memory": "3Gi"},                     # memory overridden, cpu default
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == k8s.RUN_AS_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert env["PREFECT_HOME"]["value"].startswith("/tmp/")       # writable despite the read-only root
    assert env["VISITFLOW_CREDENTIALS_BLOCK"]["value"] == "visitflow"  # plain job-variable env passes through
    assert env["PREFECT_API_URL"]["value"] == "http://127.0.0.1:9/api"


def test_rendered_job_has_no_secret_values(worker_settings):
    manifest, _ = render(load_template())
    assert k8s.secret_env_problems(manifest, PLANTED) == []
    env = env_by_name(manifest)
    assert env["VISITFLOW_CLIENT_SECRET"] == {
        "name": "VISITFLOW_CLIENT_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "visitflow-oidc", "key": "client-secret"}}}
    assert env["PREFECT_API_AUTH_STRING"] == {
        "name": "PREFECT_API_AUTH_STRING",
        "valueFrom": {"secretKeyRef": {"name": "visitflow-prefect-api", "key": "auth-string"}}}
    assert "PREFECT_API_KEY" not in env
    for value in PLANTED:
        assert value not in json.dumps(manifest)


def test_the_check_catches_the_leak_of_a_naive_template(worker_settings):
    """The stock template with secretKeyRefs added by hand: the worker's plaintext auth
    string replaces the reference.  Proves the planted-value check can fail."""
    from prefect_kubernetes.worker import KubernetesWorker

    naive = KubernetesWorker.get_default_base_job_template()
    naive["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"] = \
        k8s.secret_env_entries()
    manifest, _ = render(naive, {"image": IMAGE})
    problems = k8s.secret_env_problems(manifest, PLANTED)
    assert any(PLANTED_AUTH[:4] in p for p in problems), problems
    assert any(p.startswith("PREFECT_API_AUTH_STRING") for p in problems), problems
    assert PLANTED_AUTH in json.dumps(manifest)


def test_submitted_job_is_clean_through_the_worker(worker_settings, monkeypatch):
    """What KubernetesWorker._create_job sends to the API server, with worker.yaml's settings."""
    body = submit_through_worker(load_template(), monkeypatch, auth_secret_settings=True)
    assert k8s.secret_env_problems(body, PLANTED) == []
    validate_job(body)


def test_worker_settings_alone_also_fix_the_naive_template(worker_settings, monkeypatch):
    """Second layer: prefect-kubernetes' own auth-string substitution at submission."""
    from prefect_kubernetes.worker import KubernetesWorker

    naive = KubernetesWorker.get_default_base_job_template()
    naive["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"] = \
        k8s.secret_env_entries()
    body = submit_through_worker(naive, monkeypatch, auth_secret_settings=True)
    assert PLANTED_AUTH not in json.dumps(body)
    assert env_by_name(body)["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "visitflow-prefect-api"


# -------------------------------------------------------------- worker, RBAC, secrets


@pytest.mark.parametrize("name", ["base/worker.yaml", "base/rbac.yaml", "secrets.example.yaml"])
def test_manifests_are_strictly_valid(name):
    found = docs(name)
    assert found
    for doc in found:
        validate_strict(doc)
        assert doc["metadata"]["namespace"] == k8s.NAMESPACE


def test_worker_runs_the_pool_with_secrets_by_reference():
    container = worker_container()
    argv = " ".join(container["command"] + container["args"])
    assert re.search(r"prefect worker start --pool visitflow-k8s --type kubernetes\b", argv)
    assert "--install-policy never" in argv
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("PREFECT_API_URL", "api-url"), ("PREFECT_API_AUTH_STRING", "auth-string")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "visitflow-prefect-api", "key": key}
        assert "value" not in env[name]
    assert "VISITFLOW_CLIENT_SECRET" not in env  # only flow pods need the client secret
    plain = {n for n, e in env.items() if "value" in e}
    assert plain <= {"PREFECT_HOME", "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
                     "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME",
                     "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY", "SSL_CERT_FILE"}
    assert env["SSL_CERT_FILE"]["value"] == f"{k8s.SITE_CA[1]}/ca.crt"       # the HTTPS Prefect API's CA
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == k8s.NAMESPACE
    assert (env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"]["value"],
            env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]["value"]) \
        == k8s.SECRET_ENV["PREFECT_API_AUTH_STRING"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_is_namespaced_and_minimal():
    by_kind: dict[str, list[dict]] = {}
    for d in docs("base/rbac.yaml"):
        by_kind.setdefault(d["kind"], []).append(d)
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding"}  # nothing cluster-scoped
    (role,) = by_kind["Role"]
    (binding,) = by_kind["RoleBinding"]
    allowed = {"jobs", "pods", "pods/log", "events"}
    for rule in role["rules"]:
        assert set(rule["resources"]) <= allowed, rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    granted = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"jobs", "pods", "pods/log"} <= granted
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    bound = {s["name"] for s in binding["subjects"]}
    (deployment,) = [d for d in docs("base/worker.yaml") if d["kind"] == "Deployment"]
    assert bound == {deployment["spec"]["template"]["spec"]["serviceAccountName"]} == {k8s.WORKER_SERVICE_ACCOUNT}
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind["ServiceAccount"]}
    flow_sa = accounts[load_template()["variables"]["properties"]["service_account_name"]["default"]]
    assert flow_sa["automountServiceAccountToken"] is False
    assert flow_sa["metadata"]["name"] not in bound


def test_example_secrets_hold_placeholders_for_every_reference():
    secrets = {d["metadata"]["name"]: d for d in docs("secrets.example.yaml")}
    referenced = set(k8s.SECRET_ENV.values())
    referenced |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                   for e in worker_container()["env"] if "valueFrom" in e}
    for name, key in referenced:
        assert key in secrets[name]["stringData"], (name, key)
    for secret in secrets.values():
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert value.startswith("REPLACE_ME") or "example.org" in value, (key, value)


# ----------------------------------------------------------------- image, docs, helper


def test_flow_image_is_a_pinned_non_root_compiled_image():
    """deployments/images/ builds the image the template names (tests/images/ builds and runs it)."""
    images = ROOT / "deployments" / "images"
    runtime, flows = (images / "runtime.Containerfile").read_text(), (images / "flows.Containerfile").read_text()
    assert "-c /deps/constraints.txt" in runtime and "pip install -q --no-deps /src" in runtime
    assert "compileall" in runtime and "compileall" in flows  # site-packages and the flows
    (user,) = re.findall(r"^USER (\S+)", flows, re.M)[-1:]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == k8s.RUN_AS_UID  # numeric, so runAsNonRoot can check it
    assert "VISITFLOW_ROOT=/opt/visitflow" in flows
    assert 'CMD ["prefect", "flow-run", "execute"]' in flows  # what the worker's Job runs
    # build.sh tags it localhost/visitflow-flows:<hash>; a facility pushes it as <registry>/visitflow-flows
    assert k8s.DEFAULT_IMAGE.split(":")[0] == "visitflow-flows"
    assert "visitflow-$name" in (images / "build.sh").read_text()
    block = (images / "build.sh").read_text().split("sources_of() {", 1)[1].split("\n}\n", 1)[0]
    named = [w for w in re.findall(r"[\w./-]+", block.split("case", 1)[1]) if "/" in w or "." in w]
    assert "visitflow" in block and named, block
    for source in named:  # every file or folder an image copies is in a clean checkout
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True).stdout
        assert tracked.split(), f"build.sh copies {source}, which a clean checkout does not have"


def test_readme_shows_the_pool_command():
    text = (K8S_DIR / "README.md").read_text()
    assert ("prefect work-pool create visitflow-k8s --type kubernetes \\\n"
            "    --base-job-template deployments/kubernetes/base-job-template.json") in text


PROJECT = """
definitions:
  post: &post
    work_pool:
      name: visitflow-local
      work_queue_name: post
      job_variables: {env: {VISITFLOW_CREDENTIALS_BLOCK: visitflow}}
    tags: [visitflow, post]
deployments:
  - {name: post, entrypoint: flows/a.py:a, <<: *post}
  - {name: post, entrypoint: flows/b.py:b, <<: *post}
"""


def test_retarget_points_every_deployment_at_the_pool_and_image():
    project = yaml.safe_load(PROJECT)
    before = copy.deepcopy(project)
    out = retarget(project, IMAGE)
    assert project == before
    assert "definitions" not in out
    for dep in out["deployments"]:
        assert dep["work_pool"] == {
            "name": k8s.POOL_NAME, "work_queue_name": "post",
            "job_variables": {"env": {"VISITFLOW_CREDENTIALS_BLOCK": "visitflow"}, "image": IMAGE}}
        assert dep["tags"] == ["visitflow", "post"]


def test_retarget_adds_the_sites_job_variables_and_main_refuses_bad_ones(tmp_path, monkeypatch, capsys):
    from visitflow.production import prefect_yaml

    out = retarget(yaml.safe_load(PROJECT), IMAGE, job_variables={"cpu_request": "100m"})
    for dep in out["deployments"]:
        assert dep["work_pool"]["job_variables"] == {
            "env": {"VISITFLOW_CREDENTIALS_BLOCK": "visitflow"}, "cpu_request": "100m", "image": IMAGE}
    src = tmp_path / "prefect.yaml"
    src.write_text(PROJECT)
    monkeypatch.setenv(prefect_yaml.JOB_VARIABLES_ENV, '{"memory_request": "1Gi"}')
    assert prefect_yaml.main([str(src), IMAGE]) == 0
    written = yaml.safe_load(capsys.readouterr().out)
    assert {d["work_pool"]["job_variables"]["memory_request"] for d in written["deployments"]} == {"1Gi"}
    for bad, why in [("{cpu", "is not JSON"), ('["100m"]', "must be a JSON object"), ('{"image": "x"}', "other than image")]:
        monkeypatch.setenv(prefect_yaml.JOB_VARIABLES_ENV, bad)
        assert prefect_yaml.main([str(src), IMAGE]) == 2
        assert why in capsys.readouterr().err


def test_retarget_the_real_prefect_yaml():
    path = ROOT / "prefect.yaml"
    project = yaml.safe_load(path.read_text())
    out = retarget(project, IMAGE)
    assert len(out["deployments"]) == len(project["deployments"]) > 0
    for orig, dep in zip(project["deployments"], out["deployments"]):
        assert dep["work_pool"]["name"] == k8s.POOL_NAME
        assert dep["work_pool"]["job_variables"]["image"] == IMAGE
        assert dep["work_pool"].get("work_queue_name") == orig["work_pool"].get("work_queue_name")
        assert dep["work_pool"]["job_variables"].get("env") == orig["work_pool"].get("job_variables", {}).get("env")
