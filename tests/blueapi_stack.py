"""The real blueapi 1.21.1 server with visitflow's trigger in it, and the stack it talks to.

Used by tests/blueapi_fixtures.py and benchmarks/blueapi_latency.py.  Everything is a real
process on loopback: a dev IdP (deployments/idp.yaml plus rights on blueapi's instrument
session ``cm12345-1``), a Tiled server in blueapi's layout, a Prefect server with the warm
worker and our deployments, and ``blueapi serve`` run by blueapi's own venv
(``.ci/install-blueapi``) with OIDC on, Tiled pass-through, the hook and the example plans
loaded through its own config.  The trigger inside blueapi reaches Prefect through a
:class:`SwitchableProxy`, so a test can take Prefect away from it without stopping Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from visitflow.stack.services import Service, free_port, start_service

from .tcp_proxy import SwitchableProxy

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VISITFLOW_BLUEAPI_VENV", REPO / ".venv-blueapi"))
if not VENV.is_absolute():
    VENV = REPO / VENV
PLANS_DIR = REPO / "deployments" / "blueapi"
INSTRUMENT, PROPOSAL, SESSION = "i22", "cm12345", "cm12345-1"
#: Where blueapi writes (begin_task: <instrument>/<proposal>/<instrument_session>/<uid>) and
#: where our analyses write: the same session, in the processed store.
RAW_TEMPLATE = "{instrument}/{proposal}/{visit}/{run}"
PROCESSED_TEMPLATE = "processed/{visit}/{run}/{analysis}"
#: The flows' block: one beamline; {proposal} follows from the session (scopes.implied_values).
BLOCK_RAW_TEMPLATE = INSTRUMENT + "/{proposal}/{visit}/{run}"
SESSION_SCOPES = {
    "alice": [f"read:data:{SESSION}", f"write:data:{SESSION}", f"run:saxs_average:{SESSION}",
              f"run:peak_stats:{SESSION}"],
    "carol": [f"read:data:{SESSION}", f"write:data:{SESSION}"],   # may write, may not start analyses
}
#: blueapi takes a task's ``user`` from the token's ``fedid`` claim.
FEDIDS = {"alice": "ali12345", "carol": "car67890"}
LIGHT_MODULES = ["__init__.py", "errors.py", "grants.py", "options.py", "oauth.py", "prefect_api.py", "scopes.py", "tokens.py"]


def python() -> Path:
    return VENV / "bin" / "python"


def venv_present() -> bool:
    return python().exists() and (VENV / "freeze-blueapi-only.txt").exists()


def _digest(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _trigger_files(pkg: Path) -> list[Path]:
    return [pkg / m for m in LIGHT_MODULES] + sorted((pkg / "trigger").glob("*.py"))


def installed_package() -> Path:
    return next((VENV / "lib").glob("python*/site-packages")) / "visitflow"


def refresh_trigger() -> None:
    """Reinstall the light distribution if this checkout's trigger source changed since."""
    src = REPO / "visitflow"
    dst = installed_package()
    installed = _trigger_files(dst)
    if all(f.exists() for f in installed) and _digest(installed, dst) == _digest(_trigger_files(src), src):
        return
    subprocess.run([str(python()), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(REPO / "visitflow-trigger")], check=True, cwd=REPO, timeout=600)


def idp_config(tmp: Path) -> Path:
    """deployments/idp.yaml with Alice's and Carol's rights on the instrument session."""
    config = yaml.safe_load((REPO / "deployments" / "idp.yaml").read_text())
    for user, scopes in SESSION_SCOPES.items():
        config["users"][user]["scopes"] = list(config["users"][user]["scopes"]) + scopes
        config["users"][user]["claims"] = {"fedid": FEDIDS[user]}
    path = tmp / "idp-blueapi.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Blueapi:
    url: str
    service: Service
    trigger_state: Path

    def _headers(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def submit(self, token: str, plan: str, params: dict | None = None, session: str = SESSION) -> httpx.Response:
        return httpx.post(f"{self.url}/tasks", headers=self._headers(token), timeout=60,
                          json={"name": plan, "params": params or {}, "instrument_session": session})

    def begin(self, token: str, task_id: str) -> httpx.Response:
        return httpx.put(f"{self.url}/worker/task", headers=self._headers(token), json={"task_id": task_id},
                         timeout=60)

    def task(self, token: str, task_id: str) -> dict:
        r = httpx.get(f"{self.url}/tasks/{task_id}", headers=self._headers(token), timeout=60)
        r.raise_for_status()
        return r.json()

    def run(self, token: str, plan: str, params: dict | None = None, timeout: float = 300) -> dict:
        """POST /tasks, PUT /worker/task, wait for completion: the finished task."""
        r = self.submit(token, plan, params)
        assert r.status_code == 201, (r.status_code, r.text)
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + timeout
        while True:
            b = self.begin(token, task_id)
            if b.status_code != 409:        # 409: the previous task is still finishing
                break
            assert time.monotonic() < deadline, "blueapi's worker stayed busy"
            time.sleep(0.2)
        assert b.status_code == 200, (b.status_code, b.text)
        while True:
            task = self.task(token, task_id)
            if task["is_complete"]:
                return task
            assert time.monotonic() < deadline, f"task {task_id} not complete after {timeout}s: {task}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.service.log_path.read_text(errors="replace")


def write_configs(tmp: Path, *, port: int, issuer: str, tiled_uri: str, prefect_api_url: str,
                  max_backoff: float = 2.0) -> tuple[Path, Path]:
    """blueapi's config file and the trigger's settings file, as an operator writes them."""
    state = tmp / "trigger-state"
    blueapi_cfg = {
        "api": {"url": f"http://127.0.0.1:{port}"},
        "stomp": {"enabled": False},
        "oidc": {"issuer": issuer, "client_id": "visitflow-cli", "client_audience": "blueapi"},
        "tiled": {"enabled": True, "url": tiled_uri},   # no authentication: the caller's token passes through
        "env": {
            "metadata": {"instrument": INSTRUMENT},
            "sources": [
                {"kind": "planFunctions", "module": "visitflow.trigger.blueapi_hook"},
                {"kind": "planFunctions", "module": "visitflow_example_plans"},
            ],
        },
        "logging": {"level": "INFO"},
    }
    trigger_cfg = {
        "issuer": issuer,
        "prefect_api_url": prefect_api_url,
        "client_id": "blueapi",
        "client_secret_env": "VISITFLOW_TRIGGER_CLIENT_SECRET",
        "state_dir": str(state),
        "max_backoff": max_backoff,
    }
    a, b = tmp / "blueapi.yaml", tmp / "visitflow-trigger.yaml"
    a.write_text(yaml.safe_dump(blueapi_cfg))
    b.write_text(yaml.safe_dump(trigger_cfg))
    return a, b


def start_blueapi(tmp: Path, *, issuer: str, tiled_uri: str, prefect_api_url: str, token) -> Blueapi:
    """``token()``: a user token, to see the plans (blueapi lists them only to the authenticated)."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    blueapi_cfg, trigger_cfg = write_configs(tmp, port=port, issuer=issuer, tiled_uri=tiled_uri,
                                             prefect_api_url=prefect_api_url)
    env = {
        "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "VIRTUAL_ENV": str(VENV),
        "PYTHONPATH": str(PLANS_DIR),
        "VISITFLOW_TRIGGER_CONFIG": str(trigger_cfg),
        "VISITFLOW_TRIGGER_CLIENT_SECRET": "blueapi-dev-secret",
        "PYTHONUNBUFFERED": "1",
        "OTEL_SDK_DISABLED": "true",
    }
    for var in ("PREFECT_API_URL", "PREFECT_HOME", "VISITFLOW_TRIGGER_NO_INSTALL"):
        env[var] = ""
    service = start_service("blueapi", [str(VENV / "bin" / "blueapi"), "--config", str(blueapi_cfg), "serve"],
                            log_dir=tmp / "logs", health_url=f"http://127.0.0.1:{port}/healthz", env=env, cwd=tmp)
    try:
        service.wait_ready(timeout=240)
        _wait_plans(f"http://127.0.0.1:{port}", service, token)
    except Exception:
        service.stop()
        raise
    return Blueapi(f"http://127.0.0.1:{port}", service, tmp / "trigger-state")


def _wait_plans(url: str, service: Service, token, timeout: float = 240) -> None:
    """/healthz may answer before the worker subprocess has loaded the plans; wait for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{url}/plans", headers={"Authorization": f"Bearer {token()}"}, timeout=30)
            if r.status_code == 200 and any(p["name"] == "peak_scan" for p in r.json()["plans"]):
                return
        if service.proc.poll() is not None:
            raise RuntimeError(f"blueapi exited:\n{service.log_tail(60)}")
        time.sleep(0.5)
    raise TimeoutError(f"blueapi has no plans after {timeout}s:\n{service.log_tail(60)}")


@dataclass
class BlueapiStack:
    idp: object        # tests.idp_fixtures.IdPHandle
    tiled: object      # tests.tiled_fixtures.TiledHandle
    prefect_api: str
    prefect_env: dict
    proxy: SwitchableProxy
    blueapi: Blueapi
    services: list

    def token(self, user: str) -> str:
        return self.idp.token(user)


@contextlib.contextmanager
def running_stack(tmp: Path, *, database_url: str | None = None):
    """Start the whole stack (IdP, Tiled, Prefect + warm worker, proxy, blueapi); stop it on exit."""
    from visitflow.stack import prefect as pstack
    from visitflow.core.tiled_admin import admin_auth, ensure_visits

    from .idp_fixtures import start_idp
    from .tiled_fixtures import start_tiled

    refresh_trigger()
    services: list[Service] = []
    try:
        idp = start_idp(tmp / "idp", config=idp_config(tmp))
        services.append(idp.service)
        tiled = start_tiled(idp, tmp / "tiled", raw_template=RAW_TEMPLATE, processed_template=PROCESSED_TEMPLATE,
                            extra_args=("--allow-anonymous",))   # for blueapi's tiled[client] 0.2.18
        services.append(tiled.service)
        ensure_visits(tiled.uri, admin_auth(idp.issuer, "visitflow-admin", "admin-dev-secret"), [SESSION],
                      layout=tiled.layout, extra={"instrument": INSTRUMENT})
        state = tmp / "prefect"
        port = free_port()
        server = pstack.start_server(state, port, ui=False, database_url=database_url)
        services.append(server)
        server.wait_ready(timeout=240)
        env = pstack.prefect_env(f"http://127.0.0.1:{port}/api", state / "prefect")
        pstack.configure(env, issuer=idp.issuer, tiled_uri=tiled.uri,
                         block_fields={"raw_template": BLOCK_RAW_TEMPLATE, "processed_template": PROCESSED_TEMPLATE})
        worker = pstack.start_worker(state, env, health_port=free_port(), client_secret="visitflow-dev-secret")
        services.append(worker)
        worker.wait_ready(timeout=180)
        proxy = SwitchableProxy(port, enabled=True)
        blueapi = start_blueapi(tmp / "blueapi", issuer=idp.issuer, tiled_uri=tiled.uri,
                                prefect_api_url=f"http://127.0.0.1:{proxy.port}/api", token=lambda: idp.token("alice"))
        services.append(blueapi.service)
        yield BlueapiStack(idp, tiled, env["PREFECT_API_URL"], env, proxy, blueapi, services)
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                service.stop()
