"""The ``visitflow-k8s`` work pool's base job template, derived from prefect-kubernetes' default.

Regenerate the shipped file with::

    python -m visitflow.production.kubernetes > deployments/kubernetes/base-job-template.json

Why derived rather than hand-written: the worker validates a template against its own
expectations (container ``prefect-job``, ``restartPolicy: Never``...) and those change
between prefect-kubernetes releases.  Starting from ``get_default_base_job_template()`` and
applying a short list of edits keeps us on the upstream shape; a test fails when the shipped
JSON and this function disagree (e.g. after an upgrade), which is the cue to regenerate and
re-read the diff.

The edits, and why:

- **Secrets by reference only.**  ``VISITFLOW_CLIENT_SECRET`` and ``PREFECT_API_AUTH_STRING``
  come from Kubernetes Secrets through ``valueFrom.secretKeyRef``.  The secret *names* are
  fixed in the template, not job variables: a job variable can be set by anyone with Prefect
  API access, and must not be able to point a flow pod at another Secret.
- **Null out the worker's copies.**  A worker copies every Prefect setting set in *its own*
  environment into each Job as a plain ``value`` (``BaseJobConfiguration._base_environment``),
  and prefect-kubernetes drops a template env entry whose name collides with one of those.
  So a ``secretKeyRef`` for ``PREFECT_API_AUTH_STRING`` alone would silently be replaced by
  the worker's plaintext auth string.  ``job_configuration.env`` maps those names to ``null``;
  prefect drops ``None`` values, so the template's ``secretKeyRef`` entry survives.  (The
  worker Deployment also sets prefect-kubernetes' own
  ``PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_*`` settings: two layers.)
- **No retries by Kubernetes** (``backoffLimit: 0``, not a variable): a retried pod would
  re-run an analysis with the same grant; Prefect reschedules evicted runs instead.
- **Least privilege pods:** non-root UID, read-only root filesystem with an ``emptyDir`` at
  ``/tmp`` (``PREFECT_HOME`` lives there), all capabilities dropped, no service account
  token mounted (flow code never needs the Kubernetes API), RuntimeDefault seccomp.
- **The site's CA bundle:** every in-cluster hop is HTTPS from the site's CA (docs/deploy.md
  step 3), so each flow pod mounts ConfigMap ``visitflow-ca`` and points ``SSL_CERT_FILE``
  (httpx, Prefect's client, Python's ssl) and ``REQUESTS_CA_BUNDLE`` (requests) at it.  Not a
  job variable and not copied from the worker (``SSL_CERT_FILE`` is no Prefect setting): fixed
  here, beside the Secrets.
- **Bounded lifetime:** ``ttlSecondsAfterFinished`` and ``activeDeadlineSeconds`` default
  to values that match the grant's 24 h lifetime (a pod older than its grant is useless).
"""

from __future__ import annotations

import copy
import json
from typing import Any

__all__ = [
    'POOL_NAME', 'NAMESPACE', 'FLOW_SERVICE_ACCOUNT', 'WORKER_SERVICE_ACCOUNT', 'DEFAULT_IMAGE',
    'RUN_AS_UID', 'SECRET_ENV', 'SITE_CA', 'CA_ENV', 'SUPPRESSED_WORKER_SETTINGS', 'POD_ENV', 'VARIABLE_DEFAULTS',
    'ACTIVE_DEADLINE_DEFAULT', 'secret_env_entries', 'build_base_job_template', 'container_env',
    'secret_env_problems', 'render_job_manifest', 'main',
]

POOL_NAME = "visitflow-k8s"
NAMESPACE = "visitflow"
FLOW_SERVICE_ACCOUNT = "visitflow-flow-runner"
WORKER_SERVICE_ACCOUNT = "visitflow-worker"
DEFAULT_IMAGE = "visitflow-flows:0.1.0"
RUN_AS_UID = 10001

#: env var -> (Secret name, key).  The only way secrets reach a flow pod.
SECRET_ENV: dict[str, tuple[str, str]] = {
    "VISITFLOW_CLIENT_SECRET": ("visitflow-oidc", "client-secret"),
    "PREFECT_API_AUTH_STRING": ("visitflow-prefect-api", "auth-string"),
}
#: Prefect settings a worker may hold that must never be copied into a Job as plain values.
#: PREFECT_API_KEY is Prefect Cloud's; this deployment uses a self-hosted server + auth string.
SUPPRESSED_WORKER_SETTINGS = ("PREFECT_API_KEY",)

#: Fixed env for every flow pod (plain, not secret).  PREFECT_HOME must be writable: the
#: root filesystem is read-only, and the worker would otherwise copy *its* PREFECT_HOME.
POD_ENV = {"PREFECT_HOME": "/tmp/prefect"}

#: the site's CA bundle (ConfigMap name, mount path) and the env that points clients at it
SITE_CA = ("visitflow-ca", "/etc/visitflow-ca")
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")

VARIABLE_DEFAULTS: dict[str, Any] = {
    "namespace": NAMESPACE,
    "image": DEFAULT_IMAGE,
    "service_account_name": FLOW_SERVICE_ACCOUNT,
    "finished_job_ttl": 3600,
    "cpu_request": "500m",
    "cpu_limit": "2",
    "memory_request": "1Gi",
    "memory_limit": "4Gi",
}
ACTIVE_DEADLINE_DEFAULT = 86400


def secret_env_entries() -> list[dict]:
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for name, (secret, key) in SECRET_ENV.items()
    ]


def build_base_job_template() -> dict:
    """prefect-kubernetes' default base job template with visitflow's edits (module docstring)."""
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    config = template["job_configuration"]
    variables = template["variables"]
    props = variables["properties"]

    config["env"] = {**POD_ENV, **{name: None for name in (*SECRET_ENV, *SUPPRESSED_WORKER_SETTINGS)}}

    job = config["job_manifest"]
    job["spec"]["backoffLimit"] = 0
    # Upstream puts these two under the *pod* spec (where Kubernetes drops them) and its
    # validator insists on them there; they belong on the Job spec, so say it there too.
    job["spec"]["parallelism"] = 1
    job["spec"]["completions"] = 1
    props.pop("backoff_limit", None)
    job["spec"]["activeDeadlineSeconds"] = "{{ active_deadline_seconds }}"
    props["active_deadline_seconds"] = {
        "title": "Active Deadline Seconds",
        "description": "Kill the flow pod after this many seconds. Default: the delegation "
                       "grant's lifetime (24 h); a pod older than its grant cannot read data.",
        "type": "integer",
        "minimum": 60,
        "default": ACTIVE_DEADLINE_DEFAULT,
    }

    pod = job["spec"]["template"]["spec"]
    pod["automountServiceAccountToken"] = False
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_UID,
        "runAsGroup": RUN_AS_UID,
        "fsGroup": RUN_AS_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["volumes"] = [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
                      {"name": "ca", "configMap": {"name": SITE_CA[0]}}]

    (container,) = pod["containers"]
    container["env"] = secret_env_entries() + [{"name": n, "value": f"{SITE_CA[1]}/ca.crt"} for n in CA_ENV]
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "ca", "mountPath": SITE_CA[1], "readOnly": True}]

    for name, default in VARIABLE_DEFAULTS.items():
        props[name]["default"] = default
    props["env"]["description"] = (
        "Extra plain environment variables for flow runs. Prefect stores and shows these in "
        "clear: never put secrets here (secrets come from Kubernetes Secrets, see "
        "deployments/kubernetes/README.md)."
    )
    variables["description"] = (
        "visitflow flow runs as Kubernetes Jobs (deployments/kubernetes/). Based on "
        "prefect-kubernetes' default template; see visitflow/production/kubernetes.py."
    )
    return template


# ------------------------------------------------------------------------------- checking


def container_env(manifest: dict) -> list[dict]:
    return manifest["spec"]["template"]["spec"]["containers"][0].get("env") or []


def secret_env_problems(manifest: dict, planted: tuple[str, ...] = ()) -> list[str]:
    """Why a rendered Job manifest would leak a secret; [] when it is clean.

    Checks that each of :data:`SECRET_ENV` appears exactly once, as the expected
    ``secretKeyRef``, that none of the suppressed worker settings appear at all, and that
    none of the ``planted`` strings (known secret values) occurs anywhere in the manifest.
    """
    problems = []
    env = container_env(manifest)
    for name, (secret, key) in SECRET_ENV.items():
        entries = [e for e in env if e.get("name") == name]
        want = {"secretKeyRef": {"name": secret, "key": key}}
        if len(entries) != 1:
            problems.append(f"{name}: {len(entries)} env entries (expected exactly one secretKeyRef)")
        elif "value" in entries[0] or entries[0].get("valueFrom") != want:
            problems.append(f"{name}: not taken from Secret {secret}/{key}: {entries[0]!r}")
    for name in SUPPRESSED_WORKER_SETTINGS:
        if any(e.get("name") == name for e in env):
            problems.append(f"{name}: present in the Job (worker setting copied in clear)")
    text = json.dumps(manifest)
    for value in planted:
        if value and value in text:
            problems.append(f"a known secret value ({value[:4]}...) appears in the manifest")
    return problems


async def render_job_manifest(template: dict, values: dict, flow_run, deployment=None, flow=None,
                              work_pool=None, worker_name: str | None = None) -> dict:
    """The Job manifest a kubernetes worker would submit for ``flow_run`` (before its own
    last-step secret substitution in ``_create_job``), using prefect-kubernetes' code."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
    config.prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name)
    return config.job_manifest


def main() -> None:
    print(json.dumps(build_base_job_template(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
