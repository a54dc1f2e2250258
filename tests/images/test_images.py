"""The images deployments/images/build.sh builds, as built: cached, non-root, free of the build
machine's secrets, each service answering its health check, and the flow image running a real
``saxs_average`` post run (real token service, Tiled and Prefect on the host; the container is
the flow-run process, exactly what a Job from the ``visitflow-k8s`` template runs)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
import yaml

from visitflow.flow.sink import read_result
from visitflow.production import kubernetes as k8s
from visitflow.stack.services import free_port

from tests.fixtures.image_fixtures import PLANTED, RUNNABLE, build, podman, read_env, run_container
from tests.fixtures.prefect_fixtures import CLIENT_SECRET, running_prefect
from tests.fixtures.references import assert_matches, reference_of
from tests.fixtures.scans import run_scan, user_root
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[2]
UID = k8s.RUN_AS_UID
GRANT = "run:{a}:{v} read:raw:{v}/{r} write:processed:{v}/{r}"
#: every Containerfile shipped in deployments/images/ (runtime is the parent of flows, idp, tiled)
CONTAINERFILES = ("blueapi.Containerfile", "flows.Containerfile", "idp.Containerfile", "opa.Containerfile",
                  "postgres.Containerfile", "redis.Containerfile", "runtime.Containerfile", "tiled.Containerfile")
#: images FROM their own mmdebstrap root, probed by their own tools (no python, no visitflow-probe)
OWN_HEALTHCHECK = {"postgres": ["CMD", "pg_isready", "-h", "127.0.0.1", "-q"], "redis": ["CMD", "redis-cli", "ping"]}


def test_build_sh_is_a_no_op_when_warm_and_names_every_image(images):
    shipped = sorted(p.name for p in (REPO / "deployments" / "images").glob("*.Containerfile"))
    assert tuple(shipped) == CONTAINERFILES, "a Containerfile was added or removed: build and test it"
    assert {f.split(".")[0] for f in CONTAINERFILES} == set(RUNNABLE) | {"runtime"}
    assert set(RUNNABLE) <= set(images.tags) and set(RUNNABLE) <= set(images.archives)
    again = build()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "building" not in again.stderr and "mmdebstrap" not in again.stderr, again.stderr
    listed = {line.split()[0]: line.split()[1:] for line in again.stdout.splitlines()}
    for name in RUNNABLE:
        tag, archive = listed[name]
        assert tag == images.tags[name] and tag.startswith(f"localhost/visitflow-{name}:")
        assert Path(archive) == images.archives[name] and Path(archive).stat().st_size > 0
    archives = build("--archives")
    assert [Path(p) for p in archives.stdout.split()] == [images.archives[n] for n in RUNNABLE]
    tags, _ = read_env(images.archives["flows"].parent.with_name("images.env").read_text())
    assert tags == images.tags


def test_a_build_forgets_the_previous_builds_of_each_image(images):
    """Another hash's archive and Podman tag of a built image are removed; the current stay.
    (Unpruned, the cache grew ~5 GB a commit until the kubelet evicted Pods for disk pressure.)"""
    stale_archive = images.archives["redis"].with_name("visitflow-redis-0123456789abcdef.tar")
    stale_archive.write_bytes(b"an older build")
    other_archive = images.archives["redis"].with_name("visitflow-redisx-0123456789abcdef.tar")
    other_archive.write_bytes(b"not an image build.sh makes")
    stale_tag = "localhost/visitflow-redis:0123456789abcdef"
    podman("tag", images.tags["redis"], stale_tag)
    try:
        again = build()
        assert again.returncode == 0, again.stderr[-3000:]
        assert not stale_archive.exists()
        assert images.archives["redis"].stat().st_size > 0
        tags = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/visitflow-redis").stdout.split()
        assert tags == [images.tags["redis"]], tags
        assert other_archive.exists()                 # visitflow-redis-* only, not a longer name
    finally:
        other_archive.unlink(missing_ok=True)
        podman("rmi", "--ignore", stale_tag, check=False)


@pytest.mark.parametrize("name", ["flows", "opa"])
def test_archive_is_what_ctr_imports_with_the_tag(images, name):
    """docker-archive: its manifest names the tag, so `ctr -n k8s.io images import` keeps it."""
    with tarfile.open(images.archives[name]) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == [images.tags[name]]


@pytest.mark.parametrize("name", RUNNABLE)
def test_image_runs_as_the_numeric_non_root_user_and_carries_no_build_inputs(images, name):
    tag = images.tags[name]
    inspect = json.loads(podman("image", "inspect", tag).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == f"{UID}:{UID}"  # numeric: Kubernetes' runAsNonRoot can check it
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", tag, "-c",
                 "id -u; id -g; for p in /src /deps /tmp/pip-ca.crt /usr/bin/gcc /usr/bin/make; do"
                 " [ -e $p ] && echo has $p; done; true").stdout.split()
    assert out[:2] == [str(UID), str(UID)] and not out[2:], out
    assert not any(e.startswith("PIP_") for e in config.get("Env") or [])
    if name in OWN_HEALTHCHECK:
        assert inspect["Healthcheck"]["Test"] == OWN_HEALTHCHECK[name]
        assert not podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", tag, "-c",
                          "command -v python3 || true").stdout.strip()       # its own root: no python
    elif name != "flows":
        assert inspect["Healthcheck"]["Test"] == ["CMD", "visitflow-probe"]  # podman lists it beside Config
        assert any(e.startswith("VISITFLOW_PROBE_URL=http://127.0.0.1:") for e in config["Env"])


def _contains(path: Path, needles: list[bytes], chunk: int = 1 << 24) -> set[bytes]:
    found, keep, tail = set(), max(map(len, needles)), b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            data = tail + block
            found |= {n for n in needles if n in data}
            tail = data[-keep:]
    return found


def test_no_planted_secret_in_any_layer_history_or_config(images):
    """The build ran with PLANTED in its environment (tests/fixtures/image_fixtures.py)."""
    needles = [v.encode() for v in PLANTED.values()]
    for name in RUNNABLE:
        tag = images.tags[name]
        history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
        inspect = podman("image", "inspect", tag).stdout
        for value in PLANTED.values():
            assert value not in history and value not in inspect, (name, value)
        assert not _contains(images.archives[name], needles), name
    # the scan finds what a layer does hold (the probe's text, a file in the opa image)
    probe = (REPO / "deployments" / "images" / "probe").read_bytes()[:60]
    assert _contains(images.archives["opa"], [probe]) == {probe}


# -- each service image, run with --network host on free ports --------------------------------

def _health(cname: str) -> None:
    result = podman("healthcheck", "run", cname, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)


@pytest.fixture(scope="module")
def idp_container(images, tmp_path_factory):
    """The token-service image with the shipped dev config (deployments/idp.yaml) mounted as is."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with run_container(images.tags["idp"], ["--host", "127.0.0.1", "--port", str(port)], name="idp",
                       log_dir=tmp_path_factory.mktemp("idp-image"), health_url=f"{url}/health",
                       options=["-e", f"VISITFLOW_PROBE_URL={url}/health",
                                "-v", f"{REPO / 'deployments' / 'idp.yaml'}:/etc/visitflow/idp.yaml:ro"]) as (_, cname):
        yield url, cname


def test_idp_image_answers_its_health_check_and_issues_tokens(idp_container):
    url, cname = idp_container
    _health(cname)
    assert httpx.get(f"{url}/.well-known/openid-configuration").json()["issuer"] == url
    token = httpx.post(f"{url}/token", data={"grant_type": "client_credentials", "client_id": "visitflow-admin",
                                            "client_secret": "admin-dev-secret"})
    assert token.status_code == 200 and token.json()["access_token"], token.text


def test_tiled_image_answers_its_health_check_with_our_auth(images, idp_container, tmp_path):
    issuer, _ = idp_container
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--issuer", issuer, "--state-dir", "/tmp/state", "--host", "127.0.0.1", "--port", str(port)]
    with run_container(images.tags["tiled"], args, name="tiled", log_dir=tmp_path, health_url=f"{url}/healthz",
                       options=["--read-only", "--tmpfs", "/tmp", "-e", f"VISITFLOW_PROBE_URL={url}/healthz"]) as (_, cname):
        _health(cname)
        assert httpx.get(f"{url}/api/v1/search/").status_code == 401  # no token: AuthGate refuses
        bad = httpx.get(f"{url}/api/v1/search/", headers={"Authorization": "Bearer not-a-jwt"})
        assert bad.status_code == 401, bad.text


def test_opa_image_answers_its_health_check(images, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with run_container(images.tags["opa"], ["run", "--server", f"--addr=127.0.0.1:{port}"], name="opa",
                       log_dir=tmp_path, health_url=f"{url}/health",
                       options=["-e", f"VISITFLOW_PROBE_URL={url}/health"]) as (_, cname):
        _health(cname)
        assert httpx.get(f"{url}/v1/data").status_code == 200


def _postgres_container(images, tmp_path, port: int, env: dict[str, str], volume: str):
    options = ["--read-only", "--cap-drop", "ALL", "--tmpfs", "/tmp", "--tmpfs", "/var/run/postgresql",
               "-v", f"{volume}:/var/lib/postgresql/data"]
    for key, value in env.items():
        options += ["-e", f"{key}={value}"]
    return run_container(images.tags["postgres"], ["-c", f"port={port}"], name="postgres", log_dir=tmp_path,
                         health_url=None, options=options)


def test_postgres_image_makes_each_services_role_and_database_from_its_url(images, tmp_path):
    """As deployments/kubernetes/base/services/postgres.yaml runs deployments/images/postgres-entrypoint:
    read-only root, no capabilities, the superuser password and the services' URLs from the
    environment; a second start with a rotated password takes it, and a malformed URL stops the
    container naming the variable, before anything is touched."""
    port, volume = free_port(), f"visitflow-test-pg-{os.getpid()}"
    su, prefect_pw, tiled_pw = "su-" + os.urandom(6).hex(), "p@ss/" + os.urandom(4).hex(), os.urandom(8).hex()
    quoted = prefect_pw.replace("@", "%40").replace("/", "%2F")         # a URL percent-encodes; the role gets it decoded
    env = {"POSTGRES_PASSWORD": su,
           "VISITFLOW_DATABASE_URL_PREFECT": f"postgresql+asyncpg://prefect:{quoted}@postgres:5432/prefect",
           "VISITFLOW_DATABASE_URL_TILED": f"postgresql://tiled:{tiled_pw}@postgres.visitflow.svc:5432/tiled"}

    def sql(user, password, db, query="select 1"):   # psql: the client .ci/install-postgres installs
        return subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db,
                               "-c", query], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"})

    def ok(user, password, db, query="select 1"):
        out = sql(user, password, db, query)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def refused(user, password, db):
        out = sql(user, password, db)
        return out.returncode != 0 and "password authentication failed" in out.stderr

    def accepting():
        return sql("postgres", su, "postgres").returncode == 0

    try:
        with _postgres_container(images, tmp_path, port, env, volume) as container:
            wait_until(accepting, 120, "visitflow-postgres accepts the superuser")
            assert ok("prefect", prefect_pw, "prefect", "select current_user, current_database()") == "prefect|prefect"
            ok("prefect", prefect_pw, "prefect", "create table kept (a int)")   # the role owns its database
            assert refused("tiled", "wrong", "tiled")
            assert ok("tiled", tiled_pw, "tiled", "select count(*) from pg_tables where tablename = 'kept'") == "0"
            # a Pod deletion (kubelet) and `podman stop` send the image's STOPSIGNAL: SIGINT, PostgreSQL's
            # fast shutdown, which ends open sessions; SIGTERM (smart) would wait for this one to disconnect
            session = subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect",
                                        "-c", "select pg_sleep(300)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env={**os.environ, "PGPASSWORD": prefect_pw})
            wait_until(lambda: ok("postgres", su, "postgres", "select count(*) from pg_stat_activity "
                                  "where query like 'select pg_sleep%'") == "1", 30, "the open session")
            (_, cname) = container
            podman("stop", "-t", "120", cname)
            _, err = session.communicate(timeout=60)
            assert "terminating connection due to administrator command" in err, err
            assert podman("image", "inspect", "--format", "{{.Config.StopSignal}}",
                          images.tags["postgres"]).stdout.strip() == "SIGINT"
        assert "received fast shutdown request" in container[0].log_path.read_text()
        # emulated: what the kubelet's fsGroup does to the volume at each mount (group rwx + setgid on
        # the data directory); the entrypoint must set 0700 again or PostgreSQL refuses to start
        mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
        pgdata = Path(mountpoint) / "pgdata"
        pgdata.chmod(0o2770)
        rotated = os.urandom(8).hex()
        with _postgres_container(images, tmp_path, port, {**env, "VISITFLOW_DATABASE_URL_TILED":
                                                          f"postgresql://tiled:{rotated}@postgres/tiled"}, volume):
            wait_until(accepting, 120, "visitflow-postgres restarted on its volume")
            assert ok("prefect", prefect_pw, "prefect", "select count(*) from kept") == "0"   # the volume was kept
            assert ok("tiled", rotated, "tiled") == "1"
            assert refused("tiled", tiled_pw, "tiled")
        bad = podman("run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "-e", f"POSTGRES_PASSWORD={su}",
                     "-e", "VISITFLOW_DATABASE_URL_TOKENS=postgresql://nopassword@postgres/tokens",
                     images.tags["postgres"], check=False)
        assert bad.returncode == 2 and "VISITFLOW_DATABASE_URL_TOKENS is not postgresql://" in bad.stderr, bad.stderr
    finally:
        podman("volume", "rm", "-f", volume, check=False)


def test_redis_image_answers_as_base_services_redis_yaml_runs_it(images, tmp_path):
    port = free_port()
    with run_container(images.tags["redis"], ["--port", str(port), "--save", "", "--appendonly", "no", "--dir", "/tmp"],
                       name="redis", log_dir=tmp_path, health_url=None,
                       options=["--read-only", "--cap-drop", "ALL", "--tmpfs", "/tmp"]) as (_, cname):
        def pong():
            out = podman("exec", cname, "redis-cli", "-p", str(port), "ping", check=False)
            return out.returncode == 0 and out.stdout.strip() == "PONG"
        wait_until(pong, 60, "visitflow-redis answers PING")
        out = podman("exec", cname, "redis-cli", "-p", str(port), "config", "get", "save").stdout.split()
        assert out == ["save"]                                            # nothing persisted


def test_blueapi_image_starts_with_the_hook_and_the_plans(images, idp_container, tmp_path):
    issuer, _ = idp_container
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.yaml").write_text(yaml.safe_dump({
        "api": {"url": url}, "stomp": {"enabled": False}, "logging": {"level": "INFO"},
        "env": {"sources": [{"kind": "planFunctions", "module": "visitflow.trigger.blueapi_hook"},
                            {"kind": "planFunctions", "module": "visitflow_example_plans"}]},
    }))
    (config / "visitflow-trigger.yaml").write_text(yaml.safe_dump({
        "issuer": issuer, "prefect_api_url": "http://127.0.0.1:9/api", "client_id": "blueapi",
        "client_secret_env": "VISITFLOW_TRIGGER_CLIENT_SECRET", "state_dir": "/tmp/trigger-state"}))
    options = ["--read-only", "--tmpfs", "/tmp", "-v", f"{config}:/etc/blueapi:ro",
               "-e", "VISITFLOW_TRIGGER_CONFIG=/etc/blueapi/visitflow-trigger.yaml",
               "-e", "VISITFLOW_TRIGGER_CLIENT_SECRET=blueapi-dev-secret",
               "-e", f"VISITFLOW_PROBE_URL={url}/healthz"]
    with run_container(images.tags["blueapi"], [], name="blueapi", log_dir=tmp_path, health_url=f"{url}/healthz",
                       options=options) as (service, cname):
        _health(cname)

        def plans():
            r = httpx.get(f"{url}/plans", timeout=10)
            return r.status_code == 200 and {p["name"] for p in r.json()["plans"]}
        names = wait_until(plans, 120, "blueapi lists the example plans")
        assert {"peak_scan", "plain_scan"} <= names, names
        log = service.log_path.read_text(errors="replace")
        assert "visitflow trigger installed" in log and "NOT installed" not in log, service.log_tail()


# -- the flow image as the flow-run process -------------------------------------------------

def _job_env(variant: str) -> dict:
    """What the worker puts in a Job's env from prefect.yaml's job variables for ``variant``."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return dict(project["definitions"][variant]["work_pool"]["job_variables"]["env"])


def test_flow_image_runs_saxs_average_post_and_equals_numpy(images, idp, tiled_server, tmp_path):
    analysis, visit = "saxs_average", "a1"
    with running_prefect(tmp_path / "prefect", issuer=idp.issuer, tiled_uri=tiled_server.uri,
                         with_worker=False) as stack:
        uid = run_scan(tiled_server.uri, idp.token("alice"), num=15)
        grant = idp.exchange(idp.token("alice"), "blueapi", audience="visitflow",
                             scope=GRANT.format(a=analysis, v=visit, r=uid))["access_token"]
        stack.store_grant(analysis, visit, uid, grant)
        # the facility's way onto the Kubernetes pool, the shipped script as shipped: pool from the
        # shipped template, deployments retargeted to the image, pull step stored unresolved
        # ({{ $VISITFLOW_ROOT }}: the image says /opt/visitflow).  No Kubernetes worker here, so the
        # run waits SCHEDULED until the container below executes it, as the Job's pod would.
        deploy_env = {**os.environ, **stack.env, "VISITFLOW_K8S_OUT": str(tmp_path / "k8s")}
        deploy_env.pop("VISITFLOW_ROOT", None)
        deployed = subprocess.run(["bash", str(REPO / "deployments" / "kubernetes" / "use-k8s-pool.sh"),
                                   images.tags["flows"], "--deploy"], env=deploy_env, capture_output=True,
                                  text=True, timeout=600)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        run = stack.api.create_analysis_run(analysis, "post", visit, uid)
        env = {**{k: v for k, v in stack.env.items() if k.startswith("PREFECT_")}, **_job_env("post"),
               **k8s.POD_ENV, "PREFECT__FLOW_RUN_ID": run["id"], "VISITFLOW_CLIENT_SECRET": CLIENT_SECRET}
        flags = [f for k, v in env.items() for f in ("-e", f"{k}={v}")]
        # the Job template's pod: read-only root, /tmp an emptyDir, no capabilities, no new privileges
        result = podman("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *flags,
                        images.tags["flows"], timeout=900, check=False)
        (tmp_path / "flow-run.log").write_text(f"{result.stdout}\n--- stderr ---\n{result.stderr}")
        final = stack.api.wait_for_flow_run(run["id"], timeout=120)
        assert final["state"]["type"] == "COMPLETED", (final["state"]["message"], result.stderr[-6000:])
        assert result.returncode == 0, result.stderr[-3000:]

    root = user_root(tiled_server.uri, idp.token("alice"))
    node = root[f"processed/{visit}/{uid}/{analysis}"]
    assert_matches(read_result(node), reference_of(analysis, root[f"raw/{visit}/{uid}/primary"]))
    meta = node[node.metadata["current"]].metadata
    assert meta["status"] == "complete" and meta["frames_processed"] == 15 and meta["flow_run_id"] == run["id"]
    assert meta["code_version"].startswith("visitflow==")  # the image's install, not this checkout's git
