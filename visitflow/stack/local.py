"""``visitflow up`` / ``down`` / ``status``: the whole stack on one machine.

Dev IdP, Tiled (SQLite catalog, local storage), Prefect server (SQLite) and a process worker
on loopback; all state, logs and the record of what runs (``stack.json``) live under one
directory (``.visitflow/`` by default).  ``up`` reuses whatever is already running and
healthy, so it is safe to run twice; ``down`` stops exactly the process groups ``up``
started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from .services import start_service, stop_group
from ..errors import ServiceFailed
from . import prefect as pstack

__all__ = ['DEV_SECRETS', 'StackConfig', 'Record', 'healthy', 'alive', 'say', 'LocalStack']

DEV_SECRETS = {"visitflow": "visitflow-dev-secret", "visitflow-admin": "admin-dev-secret",
               "blueapi": "blueapi-dev-secret"}


@dataclass
class StackConfig:
    state_dir: Path = Path(os.environ.get("VISITFLOW_STATE", ".visitflow"))
    idp_port: int = 8180
    tiled_port: int = 8000
    prefect_port: int = 4200
    worker_health_port: int = 8182  # not 8181: OPA's default port, which a facility host may run
    visits: tuple = ("a1", "a2")
    idp_config: Path = pstack.REPO / "deployments" / "idp.yaml"
    post_limit: int = 4          # post runs at once, overall (work-queue limit)
    live_per_visit: int = 4      # live runs at once, per visit (global concurrency limit)
    ui: bool = True
    worker_type: str = pstack.DEFAULT_WORKER_TYPE   # "visitflow" (warm) or "process" (stock)
    #: where detectors write a visit's files, e.g. /data/{visit} (see visitflow.tiled.file_roots)
    raw_file_root: Optional[str] = field(default_factory=lambda: os.environ.get("VISITFLOW_RAW_FILE_ROOT") or None)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.idp_port}"

    @property
    def tiled_uri(self) -> str:
        return f"http://127.0.0.1:{self.tiled_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"


@dataclass
class Record:
    """What ``up`` started: enough for ``down`` and ``status`` in another process."""

    services: dict = field(default_factory=dict)   # name -> {pid, health, log}
    issuer: str = ""
    tiled_uri: str = ""
    prefect_api: str = ""

    @classmethod
    def load(cls, state: Path) -> "Record":
        path = state / "stack.json"
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        (state / "stack.json").write_text(json.dumps(asdict(self), indent=2))


def healthy(url: str | None) -> bool:
    if not url:
        return False
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def say(message: str) -> None:
    print(f"[visitflow] {message}", flush=True)


class LocalStack:
    def __init__(self, config: StackConfig | None = None):
        self.config = config or StackConfig()
        self.state = self.config.state_dir.resolve()
        self.logs = self.state / "logs"
        self.record = Record.load(self.state)

    @property
    def prefect_auth(self) -> str:
        """This stack's Prefect auth string (``<state>/prefect-auth``, 0600; made on first use)."""
        return pstack.auth_string(self.state)

    # ---------------------------------------------------------------- one service
    def _ensure(self, name: str, argv: list[str], health: str, *, env: dict | None = None,
                timeout: float = 180) -> bool:
        """Start ``name`` unless it already answers ``health``; returns True if started now."""
        if healthy(health):
            say(f"{name}: already running ({health})")
            return False
        old = self.record.services.get(name, {})
        if alive(old.get("pid")):  # running but not healthy (starting, or wedged): restart it
            stop_group(old["pid"])
        t0 = time.monotonic()
        service = start_service(name, argv, log_dir=self.logs, health_url=health, env=env, cwd=pstack.REPO)
        self.record.services[name] = {"pid": service.pid, "health": health, "log": str(service.log_path)}
        self.record.save(self.state)
        try:
            service.wait_ready(timeout=timeout)
        except ServiceFailed:
            say(f"{name}: failed to start; see {service.log_path}")
            raise
        say(f"{name}: started in {time.monotonic() - t0:.1f}s (pid {service.pid}, log {service.log_path})")
        return True

    # ---------------------------------------------------------------- up / down / status
    def up(self) -> Record:
        c = self.config
        self.state.mkdir(parents=True, exist_ok=True)
        py = sys.executable
        self._ensure("idp", [py, "-m", "visitflow.cli", "idp", "--config", str(c.idp_config), "--port",
                             str(c.idp_port), "--keys-dir", str(self.state / "idp-keys"), "--log-level", "warning"],
                     f"{c.issuer}/health", timeout=60)
        self._ensure("tiled", [py, "-m", "visitflow.cli", "tiled", "serve", "--issuer", c.issuer,
                               "--state-dir", str(self.state / "tiled"), "--port", str(c.tiled_port),
                               "--log-level", "warning",
                               *(["--file-root", f"raw={c.raw_file_root}"] if c.raw_file_root else [])],
                     f"{c.tiled_uri}/api/v1/", timeout=180)
        from ..core.tiled_admin import admin_auth, ensure_visits

        created = ensure_visits(c.tiled_uri, admin_auth(c.issuer, "visitflow-admin", DEV_SECRETS["visitflow-admin"]),
                                c.visits)
        if created:
            say(f"tiled: created {', '.join(created)}")
        auth = self.prefect_auth
        argv, env, health = pstack.server_command(self.state, c.prefect_port, ui=c.ui, auth=auth,
                                                  database_url=os.environ.get("VISITFLOW_PREFECT_DATABASE_URL"))
        server_started = self._ensure("prefect-server", argv, health, env=env, timeout=240)
        env = pstack.prefect_env(c.prefect_api, self.state / "prefect", auth)
        worker_health = f"http://127.0.0.1:{c.worker_health_port}/health"
        if server_started or not healthy(worker_health):
            say("prefect: work pool, queues, block and deployments (prefect deploy --all)...")
            t0 = time.monotonic()
            pstack.configure(env, issuer=c.issuer, tiled_uri=c.tiled_uri, post_limit=c.post_limit,
                             worker_type=c.worker_type)
            self._visit_limits()
            say(f"prefect: configured in {time.monotonic() - t0:.1f}s")
        argv, wenv, _ = pstack.worker_command(env, health_port=c.worker_health_port,
                                              client_secret=DEV_SECRETS["visitflow"], worker_type=c.worker_type,
                                              allowed_endpoints=(c.issuer, c.tiled_uri))
        self._ensure("worker", argv, worker_health, env=wenv, timeout=120)
        self.record.issuer, self.record.tiled_uri, self.record.prefect_api = c.issuer, c.tiled_uri, c.prefect_api
        self.record.save(self.state)
        return self.record

    def _visit_limits(self) -> None:
        from ..core.prefect_api import PrefectAPI
        from ..production.provision import Report, provision_limits

        # The limits' one owner is `visitflow provision`; the local stack keeps other visits' limits.
        with PrefectAPI(self.config.prefect_api, self.prefect_auth) as api:
            provision_limits(api, {v: self.config.live_per_visit for v in self.config.visits}, Report(),
                             say=lambda line: None, prune=False)

    def down(self) -> list[str]:
        stopped = []
        for name in ("worker", "prefect-server", "tiled", "idp"):
            info = self.record.services.get(name)
            if info and alive(info.get("pid")):
                stop_group(info["pid"])
                stopped.append(name)
                say(f"{name}: stopped (pid {info['pid']})")
            self.record.services.pop(name, None)
        self.record.save(self.state)
        return stopped

    def status(self) -> list[tuple[str, str, str]]:
        rows = []
        for name, info in self.record.services.items():
            state = "healthy" if healthy(info.get("health")) else ("starting/unhealthy" if alive(info.get("pid"))
                                                                  else "stopped")
            rows.append((name, state, info.get("health", "")))
        return rows
