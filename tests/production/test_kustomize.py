"""The kustomize base and overlays of deployments/kubernetes/, rendered by ``kubectl kustomize``
(the kubectl that deployments/cluster/build.sh builds) and validated strictly offline against the
Kubernetes 1.30 and 1.37 schemas -- the same output the facility suite applies to the cluster.

Why render with kubectl rather than read the files: the overlays are patches; only the rendered
objects are what a cluster receives.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.fixtures.ci import missing_part
from tests.fixtures.cluster_fixtures import K8S_DIR, kubectl_path

REPO = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.30.0", "1.37.0")
OVERLAYS = ("facility", "local")
#: the Deployments/StatefulSets whose containers serve a port and so must have a readiness probe
NO_PORT = {"prefect-services"}
FACILITY = K8S_DIR / "overlays" / "facility"
#: env names that hold a credential: only ever from a secretKeyRef
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|AUTH_STRING|API_KEY|_URL_WITH_PASSWORD|_TOKEN)$")


def render(overlay: str) -> list[dict]:
    kubectl = kubectl_path()
    if kubectl is None:
        missing_part("kubectl not built: bash .ci/install-kubernetes (deployments/cluster/build.sh)")
    out = subprocess.run([str(kubectl), "kustomize", str(K8S_DIR / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: render(o) for o in OVERLAYS}


def workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def containers(objs):
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield w, c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_strictly_valid_for_130_and_137(rendered, overlay):
    objs = rendered[overlay]
    assert len(objs) > 30
    for obj in objs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_service_is_there(rendered):
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered["facility"]}
    for kind, name in [("Deployment", "token-service"), ("Deployment", "tiled"), ("Deployment", "opa"),
                       ("Deployment", "opa-bundles"), ("Deployment", "prefect-server"),
                       ("Deployment", "prefect-services"), ("StatefulSet", "postgres"), ("Deployment", "redis"),
                       ("Deployment", "visitflow-worker"), ("Deployment", "blueapi-b01"),
                       ("Role", "visitflow-worker"), ("Namespace", "visitflow")]:
        assert (kind, name) in names, (kind, name)
    assert all(o["metadata"].get("namespace") == "visitflow" for o in rendered["facility"]
               if o["kind"] not in ("Namespace",))


def test_secrets_only_by_reference_and_every_reference_has_an_example(rendered):
    objs = rendered["facility"]
    assert not [o for o in objs if o["kind"] == "Secret"], "a Secret in the manifests: secrets are created out of band"
    example = {d["metadata"]["name"]: d["stringData"]
               for d in yaml.safe_load_all((K8S_DIR / "secrets.example.yaml").read_text()) if d}
    refs = set()
    for w, c in containers(objs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
            else:
                assert not SECRET_NAME.search(e["name"]), f"{w['metadata']['name']}: {e['name']} as a plain value"
    assert len(refs) >= 10
    for name, key in refs:
        assert key in example.get(name, {}), f"{name}/{key} referenced but not in secrets.example.yaml"


def test_every_configmap_a_pod_uses_is_rendered_or_made_by_a_step_of_deploy_md(rendered):
    """A ConfigMap no file renders must be one docs/deploy.md tells the site to create, or the
    Pod waits in ContainerCreating for good (the site CA bundle, OPA's bundle)."""
    objs = rendered["facility"]
    made = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    used = set()
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        used |= {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for c in spec.get("containers", []):
            used |= {e["valueFrom"]["configMapKeyRef"]["name"] for e in c.get("env", [])
                     if "configMapKeyRef" in e.get("valueFrom", {})}
    steps = (REPO / "docs" / "deploy.md").read_text()
    out_of_band = used - made
    assert out_of_band == {"visitflow-ca", "visitflow-opa-bundle"}, out_of_band
    for name in out_of_band:
        assert f"kubectl -n visitflow create configmap {name} " in steps, name


#: the Services whose servers do not terminate TLS yet, and why (docs/deploy.md "Status"):
#: none -- Redis, the last, is TLS-only since prefect-redis and Tiled's cache speak TLS to it
PLAIN_SERVICES: dict[str, str] = {}
#: the port name of each Service that is not HTTPS (the TLS is PostgreSQL's or Redis' own)
NON_HTTP_PORTS = {"postgres": "pg", "redis": "redis"}


def test_every_http_server_serves_https_with_the_site_certificate(rendered):
    """Every Service but PLAIN_SERVICES: its pods mount Secret visitflow-tls (the shape of
    secrets.example.yaml, docs/deploy.md step 3), probe with scheme HTTPS, and every site URL
    is https (clients trust ConfigMap visitflow-ca)."""
    objs = rendered["facility"]
    example = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S_DIR / "secrets.example.yaml").read_text()) if d}
    assert example["visitflow-tls"]["type"] == "kubernetes.io/tls"
    assert sorted(example["visitflow-tls"]["stringData"]) == ["tls.crt", "tls.key"]
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    assert set(PLAIN_SERVICES) < set(services)
    for name, svc in services.items():
        if name in PLAIN_SERVICES:
            continue
        (w,) = [w for w in workloads(objs) if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v
                                                 for k, v in svc["spec"]["selector"].items())]
        spec = w["spec"]["template"]["spec"]
        assert [v for v in spec["volumes"] if v["name"] == "tls" and v["secret"]["secretName"] == "visitflow-tls"], name
        # the container serving the Service's port (blueapi: its tls sidecar, beamline/blueapi.yaml)
        port = NON_HTTP_PORTS.get(name, "https")
        (c,) = [c for c in spec["containers"] if any(p["name"] == port for p in c.get("ports", []))]
        assert {"name": "tls", "mountPath": "/etc/visitflow-tls", "readOnly": True} in c["volumeMounts"], name
        argv = " ".join(c.get("command", []) + c.get("args", []))
        assert "/etc/visitflow-tls/tls.crt" in argv and "/etc/visitflow-tls/tls.key" in argv, name
        for probe in ("readinessProbe", "livenessProbe"):
            if "httpGet" in c[probe]:
                assert c[probe]["httpGet"]["scheme"] == "HTTPS", (name, probe)
        assert [p["name"] for p in svc["spec"]["ports"]] == [port], name
    site = dict(line.split("=", 1) for line in (FACILITY / "site.env").read_text().splitlines()
                if line and not line.startswith("#"))
    assert all(v.startswith("https://") for v in site.values()), site
    # every PostgreSQL client verifies the server (asyncpg and libpq both read these)
    for w, c in containers(objs):
        if w["metadata"]["name"] in ("token-service", "tiled", "prefect-server", "prefect-services"):
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PGSSLMODE"] == "verify-full" and env["PGSSLROOTCERT"] == "/etc/visitflow-ca/ca.crt", w
    # every Redis client speaks TLS to it and verifies it against the site CA
    for w, c in containers(objs):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if w["metadata"]["name"] in ("prefect-server", "prefect-services"):
            assert env["PREFECT_REDIS_MESSAGING_SSL"] == "true" and env["SSL_CERT_FILE"] == "/etc/visitflow-ca/ca.crt", w
        argv = c.get("command", []) + c.get("args", [])
        if "--streaming-cache" in argv:
            assert argv[argv.index("--streaming-cache") + 1].startswith("rediss://"), argv
            assert env["SSL_CERT_FILE"] == "/etc/visitflow-ca/ca.crt", w
    assert "kubectl -n visitflow create secret tls visitflow-tls " in (REPO / "docs" / "deploy.md").read_text()


def test_every_container_has_probes_resources_and_runs_restricted(rendered):
    for w, c in containers(rendered["facility"]):
        name = w["metadata"]["name"]
        assert c.get("livenessProbe"), name
        if name not in NO_PORT:
            assert c.get("ports") and (c.get("readinessProbe") or name == "visitflow-worker"), name
        assert set(c["resources"]) == {"requests", "limits"}, name
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
        assert sc["readOnlyRootFilesystem"] is True, name
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name


def test_ingress_is_denied_by_default_and_each_service_admits_named_callers(rendered):
    objs = rendered["facility"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    for svc in [o for o in objs if o["kind"] == "Service"]:
        selector = set(svc["spec"]["selector"].items())
        (labels,) = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)
                     if selector <= set(w["spec"]["template"]["metadata"]["labels"].items())]
        admitting = [p for p in policies if p["spec"].get("ingress")
                     and set(p["spec"]["podSelector"].get("matchLabels", {}).items()) <= set(labels.items())]
        assert admitting, f"no NetworkPolicy admits anyone to Service {svc['metadata']['name']}"
        ports = {q["targetPort"] for q in svc["spec"]["ports"]}
        (pod,) = [w["spec"]["template"]["spec"] for w in workloads(objs)
                  if w["spec"]["template"]["metadata"]["labels"] == labels]
        numbers = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])
                   if p["name"] in ports or p["containerPort"] in ports}
        assert numbers, svc["metadata"]["name"]
        allowed = {q["port"] for p in admitting for rule in p["spec"]["ingress"] for q in rule.get("ports", [])}
        assert numbers <= allowed, (svc["metadata"]["name"], numbers, allowed)


def strip_site_swaps(objs):
    """The objects with image names and storage classes blanked: what local may change."""
    out = copy.deepcopy(objs)
    for o in out:
        if o["kind"] == "PersistentVolumeClaim":
            o["spec"]["storageClassName"] = None
        if o["kind"] == "StatefulSet":
            for t in o["spec"].get("volumeClaimTemplates", []):
                t["spec"]["storageClassName"] = None
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                c["image"] = None
    return out


def test_local_overlay_swaps_only_images_and_storage_classes(rendered):
    facility, local = rendered["facility"], rendered["local"]
    assert strip_site_swaps(facility) == strip_site_swaps(local)
    images = {c["image"] for _, c in containers(local)}
    assert images and all(i.startswith("localhost/visitflow-") and i.endswith(":local") for i in images), images
    classes = {o["spec"]["storageClassName"] for o in local if o["kind"] == "PersistentVolumeClaim"}
    assert classes == {"visitflow-local"}
    assert {c["image"] for _, c in containers(facility)} != images


def test_overlay_token_service_config_is_the_shipped_one_with_site_urls():
    shipped = yaml.safe_load((K8S_DIR.parent / "token-service.yaml").read_text())
    overlay = yaml.safe_load((FACILITY / "token-service.yaml").read_text())
    site = dict(line.split("=", 1) for line in (FACILITY / "site.env").read_text().splitlines()
                if line and not line.startswith("#"))
    assert overlay["federation"]["issuers"][0]["issuer"] == site["FACILITY_ISSUER"]
    assert overlay["federation"]["authority"]["url"] == site["OPA_URL"]
    for doc in (shipped, overlay):
        doc["federation"]["issuers"][0]["issuer"] = doc["federation"]["authority"]["url"] = None
    assert overlay == shipped


def test_beamline_config_uses_the_site_values():
    site = dict(line.split("=", 1) for line in (FACILITY / "site.env").read_text().splitlines()
                if line and not line.startswith("#"))
    for bl in (FACILITY / "beamlines").iterdir():
        trigger = yaml.safe_load((bl / "trigger.yaml").read_text())
        config = yaml.safe_load((bl / "config.yaml").read_text())
        assert trigger["issuer"] == site["TOKEN_ISSUER"]
        assert trigger["prefect_api_url"] == site["PREFECT_API_URL"]
        assert config["tiled"]["url"] == site["TILED_URL"]
        assert config["oidc"]["issuer"] == site["FACILITY_ISSUER"]
        assert config["env"]["metadata"]["instrument"] == bl.name


#: every file under deployments/kubernetes/ that the overlays load (resources, configMap files,
#: envs): :func:`test_every_manifest_file_is_reached_by_the_overlays` checks this list against
#: the kustomizations themselves, so a manifest nobody renders cannot be shipped.
RENDERED_FILES = (
    "base/kustomization.yaml", "base/rbac.yaml", "base/worker.yaml",
    "base/services/namespace.yaml", "base/services/network-policies.yaml", "base/services/opa.yaml",
    "base/services/postgres.yaml", "base/services/prefect-server.yaml", "base/services/redis.yaml",
    "base/services/tiled.yaml", "base/services/token-service.yaml",
    "beamline/kustomization.yaml", "beamline/blueapi.yaml",
    "overlays/facility/kustomization.yaml", "overlays/facility/site.env", "overlays/facility/token-service.yaml",
    "overlays/facility/beamlines/b01/kustomization.yaml", "overlays/facility/beamlines/b01/config.yaml",
    "overlays/facility/beamlines/b01/trigger.yaml",
    "overlays/local/kustomization.yaml",
)


def _reached(directory: Path, seen: set[Path]) -> None:
    """Files a kustomization in ``directory`` loads, recursively (what ``kubectl kustomize`` reads)."""
    kfile = directory / "kustomization.yaml"
    seen.add(kfile.resolve())
    doc = yaml.safe_load(kfile.read_text())
    for ref in doc.get("resources", []):
        target = (directory / ref).resolve()
        if target.is_dir():
            _reached(target, seen)
        else:
            seen.add(target)
    for gen in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
        for name in gen.get("files", []) + gen.get("envs", []):
            seen.add((directory / name.split("=")[-1]).resolve())


def test_every_manifest_file_is_reached_by_the_overlays():
    seen: set[Path] = set()
    for overlay in OVERLAYS:
        _reached(K8S_DIR / "overlays" / overlay, seen)
    reached = sorted(str(p.relative_to(K8S_DIR.resolve())) for p in seen)
    assert reached == sorted(RENDERED_FILES), "a manifest is not rendered by any overlay (or the list is stale)"
    on_disk = sorted(str(p.relative_to(K8S_DIR)) for sub in ("base", "beamline", "overlays")
                     for p in (K8S_DIR / sub).rglob("*") if p.is_file())
    assert on_disk == sorted(RENDERED_FILES), "a file under base/, beamline/ or overlays/ is loaded by no overlay"
