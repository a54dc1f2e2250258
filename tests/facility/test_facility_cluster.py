"""The facility suite on the single-node Kubernetes of deployments/cluster/ (marker ``facility``):
the cluster itself and the manifests as applied.

What is real here: the cluster (v1.37.2 apiserver, controller-manager, scheduler, kubelet,
kube-proxy built from the Go module proxy; Debian's etcd, containerd 1.6, runc and CNI bridge;
CoreDNS), the manifests (``kubectl apply -k deployments/kubernetes/overlays/local``, the same files
the offline validation renders), Pod Security admission, RBAC, local volumes, the visitflow images
deployments/images/build.sh makes (imported by deployments/cluster/load-images.sh), and the
facility's Keycloak in production mode outside the cluster at the overlay's own FACILITY_ISSUER
host (TLS from this suite's CA, which the Pods trust through ConfigMap ``visitflow-ca``).  The
flow-run Jobs are made by Prefect's Kubernetes worker in its Pod from the pool's base job
template (``use-k8s-pool.sh --deploy``) and run the flow image.  The set-up is shared with the
story (test_facility_story.py): tests/fixtures/facility_fixtures.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import uuid

import pytest

from tests.fixtures.cluster_fixtures import K8S_DIR, Kube
from tests.fixtures.facility_fixtures import NS, SITE, SITE_JOB_VARIABLES, job_logs, rendered_local, run_probe
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.facility


# ------------------------------------------------------------------------------ the cluster


def test_node_is_ready_on_the_built_version(kube):
    (node,) = kube.json("get", "nodes")["items"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.37.2" and info["kubeProxyVersion"] in ("v1.37.2", "")
    assert info["containerRuntimeVersion"].startswith("containerd://1.")
    server = json.loads(kube.run("version", "-o", "json"))["serverVersion"]
    assert server["gitVersion"] == "v1.37.2"


def test_coredns_answers_for_services_from_a_pod(kube, probe_image):
    """Cluster DNS as deployments/cluster/coredns.yaml configures it (up.sh applies it)."""
    ok, out = run_probe(kube, probe_image, "dns-lookup", "lookup", "kubernetes.default.svc.cluster.local")
    assert ok and "10.96.0.1" in out, out


def test_a_pod_reaches_a_service_through_kube_proxy(kube, probe_image):
    echo = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}}, "template": {
            "metadata": {"labels": {"app": "echo"}},
            "spec": {"automountServiceAccountToken": False,
                     "containers": [{"name": "echo", "image": probe_image, "imagePullPolicy": "Never",
                                     "args": ["serve", ":8080"], "ports": [{"containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
               "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    kube.run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [echo, service]}))
    kube.run("-n", "default", "rollout", "status", "deployment/echo", "--timeout=240s")
    pod = kube.json("-n", "default", "get", "pods", "-l", "app=echo")["items"][0]["metadata"]["name"]
    def endpoint_ready():
        slices = kube.json("-n", "default", "get", "endpointslices", "-l", "kubernetes.io/service-name=echo")["items"]
        return any(e.get("conditions", {}).get("ready") for s in slices for e in s.get("endpoints") or [])
    wait_until(endpoint_ready, 120, "a ready endpoint for Service echo", interval=1)
    attempts = iter(range(10))

    def served():   # kube-proxy programs the rule a moment after the EndpointSlice: retry the outcome
        ok, out = run_probe(kube, probe_image, f"svc-get-{next(attempts)}", "get", "http://echo.default.svc.cluster.local/")
        return (ok, out) if ok else None
    ok, out = wait_until(served, 120, "a pod reached Service echo", interval=1)
    assert pod in out, out                                       # DNS -> ClusterIP -> kube-proxy DNAT -> the pod
    ok, out = run_probe(kube, probe_image, "api-get", "get", "https://kubernetes.default.svc/livez")
    assert ok and out.startswith("200"), out                    # the apiserver's Service, endpoint on the node



# ------------------------------------------------------------------------------ the manifests


def test_the_local_overlay_is_what_the_cluster_holds(kube, applied):
    for obj in rendered_local(kube):
        ns = obj["metadata"].get("namespace")
        got = kube.json(*(["-n", ns] if ns else []), "get", obj["kind"], obj["metadata"]["name"])
        assert got["metadata"]["name"] == obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet"):
            want = [c["image"] for c in obj["spec"]["template"]["spec"]["containers"]]
            assert [c["image"] for c in got["spec"]["template"]["spec"]["containers"]] == want


def test_restricted_pod_security_admits_every_workload_and_refuses_a_root_pod(kube, applied):
    workloads = [o for o in rendered_local(kube) if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) >= 9

    def every_workload_has_a_pod():
        pods = kube.json("-n", NS, "get", "pods")["items"]
        owners = {p["metadata"]["labels"].get("app.kubernetes.io/name") for p in pods}
        return all(w["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] in owners for w in workloads)
    wait_until(every_workload_has_a_pod, 240, "a pod for every Deployment/StatefulSet", interval=2)
    events = kube.json("-n", NS, "get", "events")["items"]
    assert not [e for e in events if "PodSecurity" in e.get("message", "")]
    root_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-pod", "namespace": NS},
                "spec": {"containers": [{"name": "c", "image": "localhost/visitflow/probe:none",
                                         "securityContext": {"runAsUser": 0}}]}}
    refused = subprocess.run([str(kube.bin_dir / "kubectl"), "create", "-f", "-"], input=json.dumps(root_pod),
                             capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)})
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr, refused.stderr
    assert "runAsUser=0" in refused.stderr, refused.stderr


def test_claims_bind_to_the_local_volumes(kube, applied):
    def bound():
        claims = kube.json("-n", NS, "get", "pvc")["items"]
        return claims and all(c["status"].get("phase") == "Bound" for c in claims) and claims
    claims = wait_until(bound, 240, "every PersistentVolumeClaim Bound", interval=2)
    assert {c["spec"]["storageClassName"] for c in claims} == {"visitflow-local"}
    assert len(claims) >= 3                                  # postgres, tiled, blueapi-b01 (the token service: in PostgreSQL)


def can_i(kube: Kube, sa: str, verb: str, resource: str) -> bool:
    out = kube.run("auth", "can-i", verb, resource, "-n", NS, f"--as=system:serviceaccount:{NS}:{sa}", check=False)
    return out.strip() == "yes"


def test_rbac_gives_the_worker_jobs_and_the_flow_runner_nothing(kube, applied):
    assert can_i(kube, "visitflow-worker", "create", "jobs.batch")
    assert can_i(kube, "visitflow-worker", "get", "pods/log")
    assert not can_i(kube, "visitflow-worker", "get", "secrets")
    assert not can_i(kube, "visitflow-worker", "create", "pods")
    for verb, res in [("get", "secrets"), ("list", "pods"), ("create", "jobs.batch")]:
        assert not can_i(kube, "visitflow-flow-runner", verb, res), (verb, res)


def test_a_flow_run_job_from_the_shipped_template_gets_its_secret_by_reference(kube, applied, probe_image):
    """The Job prefect-kubernetes renders from base-job-template.json, created as the worker
    creates it (server-side field validation Warn: the known pod-spec quirk is dropped)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.production.test_production_kubernetes import api_objects
    from visitflow.production import kubernetes as k8s

    template = json.loads((K8S_DIR / "base-job-template.json").read_text())
    # cpu_request: the template's default 500m does not fit beside the whole stack's requests
    # on this 2-core node (1,560m, with two token-service replicas): the Pod stayed Pending.
    # A facility sizes each deployment's jobs by job variables, as here for a probe.
    flow, deployment, flow_run = api_objects({"image": probe_image, "image_pull_policy": "Never",
                                              "command": "sha256env VISITFLOW_CLIENT_SECRET",
                                              "cpu_request": "100m"})
    values = dict(deployment.job_variables)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):   # rendering needs no API: discard port
        manifest = asyncio.run(k8s.render_job_manifest(template, values, flow_run, deployment, flow))
    manifest["metadata"]["name"] = "flow-run-" + str(flow_run.id)[:8]
    manifest["metadata"].pop("generateName", None)
    out = kube.run("create", "--validate=warn", "-f", "-", input=json.dumps(manifest))
    assert "created" in out                          # the pod-spec quirk (README) is dropped with a warning
    ok, log = job_logs(kube, NS, manifest["metadata"]["name"])
    secret = applied["visitflow-oidc/client-secret"]
    assert ok and log.strip() == hashlib.sha256(secret.encode()).hexdigest(), log
    (pod,) = kube.json("-n", NS, "get", "pods", "-l", f"job-name={manifest['metadata']['name']}")["items"]
    assert pod["spec"]["serviceAccountName"] == k8s.FLOW_SERVICE_ACCOUNT
    mounts = [m["mountPath"] for m in pod["spec"]["containers"][0].get("volumeMounts", [])]
    assert not [m for m in mounts if "serviceaccount" in m], mounts      # no API token in flow pods
    assert secret not in json.dumps(pod)                                  # the value never enters the Pod object


def _why_not_ready(kube: Kube) -> str:
    """Each unready Pod's phase, container states and last log lines (what a stranger needs first)."""
    out = []
    for p in kube.json("-n", NS, "get", "pods")["items"]:
        statuses = p["status"].get("containerStatuses") or []
        if statuses and all(c.get("ready") for c in statuses):
            continue
        name = p["metadata"]["name"]
        log = kube.run("-n", NS, "logs", name, "--tail=15", check=False)
        out.append(f"--- {name} {p['status'].get('phase')} {[c.get('state') for c in statuses]}\n{log}")
    return "\n".join(out)


def test_every_service_runs_its_visitflow_image_and_becomes_ready(kube, applied, visitflow_images):
    """Every Deployment and StatefulSet of the local overlay Available on the images build.sh made:
    PostgreSQL making each role from its Secret's URL, Redis, OPA with its bundle activated, two
    token-service replicas federating the production Keycloak over TLS (the site CA ConfigMap),
    Tiled, the Prefect server and services on PostgreSQL and Redis, the worker, blueapi."""
    workloads = [o for o in rendered_local(kube) if o["kind"] in ("Deployment", "StatefulSet")]

    def unready():
        left = []
        for w in workloads:
            got = kube.json("-n", NS, "get", w["kind"], w["metadata"]["name"])
            want = got["spec"].get("replicas", 1)
            if got.get("status", {}).get("readyReplicas", 0) < want:
                left.append(w["metadata"]["name"])
        return left
    try:
        wait_until(lambda: not unready(), 900, "every Deployment/StatefulSet ready", interval=5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: not ready {unready()}\n{_why_not_ready(kube)}") from None
    built = set(visitflow_images.values()) | {t.rsplit(":", 1)[0] + ":local" for t in visitflow_images.values()}
    names = {w["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for w in workloads}
    pods = [p for p in kube.json("-n", NS, "get", "pods")["items"]
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/name") in names]   # not the Jobs' Pods
    assert len(pods) >= len(workloads)
    for p in pods:
        for c in p["status"]["containerStatuses"]:      # containerd names an image by any of its tags
            assert c["image"] in built, (p["metadata"]["name"], c["image"], built)
    proxy = "/api/v1/namespaces/visitflow/services/{}/proxy{}"
    ready = kube.run("get", "--raw", proxy.format("https:token-service:8180", "/readyz"))
    assert SITE["FACILITY_ISSUER"] in ready and "postgresql answers" in ready, ready
    discovery = json.loads(kube.run("get", "--raw", proxy.format("https:token-service:8180", "/.well-known/openid-configuration")))
    assert discovery["issuer"] == SITE["TOKEN_ISSUER"]
    health = json.loads(kube.run("get", "--raw", proxy.format("https:prefect-server:4200", "/api/health")))
    assert health is True


def _tls_targets(kube: Kube) -> tuple[list[str], list[str]]:
    """Every port of every Service the local overlay renders, by its cluster DNS name: (the
    TLS ones, the names of PLAIN_SERVICES found)."""
    from tests.production.test_kustomize import PLAIN_SERVICES

    tls, plain = [], []
    for svc in (o for o in rendered_local(kube) if o["kind"] == "Service"):
        name = svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            kind = "pg:" if name == "postgres" else ""          # TLS after PostgreSQL's SSLRequest
            (plain if name in PLAIN_SERVICES else tls).append(f"{kind}{name}.{NS}.svc.cluster.local:{port['port']}")
    return tls, plain


def test_every_service_port_is_tls_from_the_site_ca_and_plain_http_gets_no_answer(kube, applied, probe_image):
    """From a Pod in the namespace: for every Service port (by its full and its short name, the
    certificate's SANs), a TLS handshake verifying against ConfigMap visitflow-ca only succeeds,
    and plain HTTP to the same port gets no HTTP answer.  The Services left plain are exactly
    the documented ones (tests/production/test_kustomize.py PLAIN_SERVICES, docs/deploy.md Status)."""
    from tests.production.test_kustomize import PLAIN_SERVICES

    tls, plain = _tls_targets(kube)
    targets = tls + [t.replace(f".{NS}.svc.cluster.local", "") for t in tls]
    ok, out = run_probe(kube, probe_image, "tls-every-service", "tls", "/etc/visitflow-ca/ca.crt", *targets,
                        ns=NS, configmaps={"visitflow-ca": "/etc/visitflow-ca"})
    print(f"\n{out}")
    assert ok, out
    assert out.count("tls ok ") == len(targets) and out.count("plain refused ") == len(targets), out
    assert len(tls) >= 6, tls                 # token service, Tiled, Prefect, OPA, bundles, ...
    assert sorted(p.split(".")[0] for p in plain) == sorted(PLAIN_SERVICES), plain
    assert "tls ok pg:postgres." in out and "plain refused pg:postgres." in out, out


def test_a_client_trusting_another_ca_is_refused_by_every_tls_service(kube, applied, probe_image, tmp_path):
    """The negative: the same Pod trusting a CA that did not sign the servers' certificate gets a
    verification error from each (not a hang, not an answer)."""
    from tests.fixtures.keycloak_production import ca_and_cert

    other, _, _ = ca_and_cert(tmp_path / "other-ca")
    kube.run("-n", NS, "create", "configmap", "other-ca", f"--from-file=ca.crt={other}")
    tls, _ = _tls_targets(kube)
    ok, out = run_probe(kube, probe_image, "tls-other-ca", "tls", "/etc/other-ca/ca.crt", *tls,
                        ns=NS, configmaps={"other-ca": "/etc/other-ca"})
    print(f"\n{out}")
    assert not ok
    assert out.count("certificate signed by unknown authority") == len(tls), out
    assert "tls ok" not in out


def test_the_worker_runs_a_flow_run_as_a_job_of_the_flow_image(kube, applied, prefect_api, deployed):
    """A flow run as the trigger creates it (docs/deploy.md step 6 done by ``deployed``): the
    worker in its Pod renders the Job from the pool's base job template, the Pod runs the flow
    image's pull step and flow, which reports back to the in-cluster Prefect with the auth string
    and reads its client secret from visitflow-oidc.  No grant was stored for this run, so the
    flow must end Failed with visitflow's own reason (not an import error, a crash or a Pod that
    never ran)."""
    from visitflow.core import names as grants
    from visitflow.core.prefect_api import PrefectAPI

    with PrefectAPI(prefect_api["PREFECT_API_URL"], prefect_api["PREFECT_API_AUTH_STRING"]) as api:
        run_id = uuid.uuid4().hex
        run = api.create_flow_run(grants.deployment_name("saxs_average", "post"),
                                  {"visit": "cm12345-1", "run_id": run_id},
                                  idempotency_key=grants.idempotency_key("saxs_average", "post", "cm12345-1", run_id, None),
                                  tags=grants.run_tags("saxs_average", "cm12345-1", run_id, "post", "b01"))
        final = api.wait_for_flow_run(run["id"], timeout=900, interval=2)
    jobs = kube.json("-n", NS, "get", "jobs", "-l", f"prefect.io/flow-run-id={run['id']}")["items"]
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]            # made by the worker, not by us
    (pod,) = kube.json("-n", NS, "get", "pods", "-l", f"job-name={jobs[0]['metadata']['name']}")["items"]
    log = kube.run("-n", NS, "logs", pod["metadata"]["name"], check=False)
    assert pod["spec"]["containers"][0]["image"] == deployed
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == SITE_JOB_VARIABLES["cpu_request"]
    assert final["state"]["type"] == "FAILED", (final["state"], log[-3000:])
    # visitflow's GrantMissing, raised in the flow body: the image, its pull step, the flow's
    # imports, the Block and the API auth all worked to get there
    assert f"no delegation grant stored for saxs_average on cm12345-1/{run_id}" in \
        (final["state"].get("message") or "") + log, (final["state"], log[-3000:])


def test_a_deleted_service_pod_is_replaced_and_its_claim_kept(kube, applied):
    def pods(name):
        return kube.json("-n", NS, "get", "pods", "-l", f"app.kubernetes.io/name={name}")["items"]
    wait_until(lambda: pods("tiled"), 120, "a tiled pod")
    (old,) = pods("tiled")
    kube.run("-n", NS, "delete", "pod", old["metadata"]["name"], "--wait=false")
    new = wait_until(lambda: [p for p in pods("tiled") if p["metadata"]["uid"] != old["metadata"]["uid"]],
                     120, "a replacement tiled pod")
    claim = [v["persistentVolumeClaim"]["claimName"] for v in new[0]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim == ["tiled-data"]
    assert kube.json("-n", NS, "get", "pvc", "tiled-data")["status"]["phase"] == "Bound"


def test_system_pods_run_and_the_pod_list_is_recorded(kube, applied):
    """`kubectl get pods -A -o wide` after the suite's workloads, printed for the report."""
    print(kube.run("get", "pods", "-A", "-o", "wide"))
    system = kube.json("-n", "kube-system", "get", "pods")["items"]
    assert system and all(p["status"]["phase"] == "Running" for p in system)
    ready = {c["type"]: c["status"] for p in system for c in p["status"]["conditions"]}
    assert ready["Ready"] == "True"
