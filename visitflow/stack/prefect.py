"""Prefect server, work pool, block, deployments and worker for the local stack.

Setup steps run Prefect's own CLI (``prefect work-pool create``, ``prefect deploy``...) in
subprocesses with the stack's environment: that is what an operator would type, and it
keeps this process free of Prefect's import-time settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..core.endpoints import ENV as ENDPOINTS_ENV
from ..core.prefect_api import PrefectAPI
from .services import Service, start_service
from ..errors import ServiceFailed

__all__ = [
    'REPO', 'POOL', 'BLOCK', 'DEFAULT_WORKER_TYPE', 'AUTH_FILE', 'auth_string', 'prefect_env', 'server_command',
    'start_server', 'run_cli', 'configure', 'worker_query_seconds', 'worker_command',
    'start_worker',
]

REPO = Path(__file__).resolve().parents[2]
POOL = "visitflow-local"
BLOCK = "visitflow"
#: ``visitflow`` = the warm worker (forked, pre-imported flow runs; visitflow/worker/);
#: ``process`` = Prefect's stock process worker.  Same pool name, same deployments.
DEFAULT_WORKER_TYPE = os.environ.get("VISITFLOW_WORKER_TYPE", "visitflow")


AUTH_FILE = "prefect-auth"


def auth_string(state: Path) -> str:
    """The stack's Prefect auth string (``visitflow:<random>``), made on first use and kept in
    ``state/prefect-auth`` (mode 0600).  Why: without it every local user can read every
    pending grant (``include_secrets``) and start flow runs (issue 20 finding 3).  The server
    gets it as ``PREFECT_SERVER_API_AUTH_STRING``; the worker, the trigger, the CLI and the UI's
    login prompt as ``PREFECT_API_AUTH_STRING`` (``export PREFECT_API_AUTH_STRING=$(cat
    .visitflow/prefect-auth)``)."""
    import secrets

    state.mkdir(parents=True, exist_ok=True)
    path = state / AUTH_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        value = path.read_text().strip()
        if value:
            return value
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        value = f"visitflow:{secrets.token_urlsafe(24)}"
        f.write(value + "\n")
    return value


def prefect_env(api_url: str, home: Path, auth: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for every Prefect process of one stack (server, CLI, worker, flow runs);
    ``auth``: the server's auth string (see :func:`auth_string`)."""
    return {
        **({"PREFECT_API_AUTH_STRING": auth} if auth else {}),
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "visitflow",  # engine/outputs logs reach the Prefect UI
        **extra,
    }


def server_command(state: Path, port: int, *, ui: bool = True, database_url: str | None = None,
                   auth: str | None = None, tls: tuple[Path, Path] | None = None) -> tuple[list[str], dict, str]:
    """(argv, env, health URL) of a Prefect server whose home is ``state/prefect``; with
    ``auth`` it requires that auth string on every API call but the health probe.

    ``tls`` (certificate, key: PEM files): HTTPS only.  ``prefect server start`` has no TLS
    flags, so the server is then what it runs in the foreground with one worker, uvicorn with
    Prefect's app factory (``create_app``, ``PREFECT__SERVER_FINAL=1`` as ``prefect server
    start`` sets it), plus uvicorn's ``--ssl-certfile/--ssl-keyfile``.  Its clients need the CA
    (``PREFECT_API_SSL_CERT_FILE``, :func:`prefect_env`'s ``extra``)."""
    home = state / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    scheme = "https" if tls else "http"
    env = prefect_env(f"{scheme}://127.0.0.1:{port}/api", home, auth,
                      **({"PREFECT_SERVER_API_AUTH_STRING": auth} if auth else {}),
                      PREFECT_UI_ENABLED="true" if ui else "false",
                      PREFECT_API_DATABASE_CONNECTION_URL=database_url
                      or f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    if tls:
        env["PREFECT__SERVER_FINAL"] = "1"
        argv = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(port), "--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
    else:
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return argv, env, f"{scheme}://127.0.0.1:{port}/api/health"


def start_server(state: Path, port: int, *, ui: bool = True, log_dir: Path | None = None,
                 database_url: str | None = None, auth: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> Service:
    argv, env, health = server_command(state, port, ui=ui, database_url=database_url, auth=auth, tls=tls)
    return start_service("prefect-server", argv, log_dir=log_dir or state / "logs", env=env, health_url=health)


def run_cli(args: list[str], env: dict, *, cwd: Path = REPO, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ServiceFailed(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def configure(env: dict, *, issuer: str, tiled_uri: str, processed_uri: str | None = None,
              secret_env: str = "VISITFLOW_CLIENT_SECRET", post_limit: int = 4,
              repo: Path = REPO, worker_type: str = DEFAULT_WORKER_TYPE, block_fields: dict | None = None) -> None:
    """Pool + queues, Block type and document, deployments from prefect.yaml (idempotent).
    ``block_fields``: more ScopedCredentials fields (e.g. ``raw_template``)."""
    run_cli(["work-pool", "create", POOL, "--type", worker_type, "--overwrite"], env)
    with PrefectAPI(env["PREFECT_API_URL"], env.get("PREFECT_API_AUTH_STRING")) as api:
        for queue, limit in (("live", None), ("post", post_limit)):
            api.ensure_work_queue(POOL, queue, limit or None)
    # The Block document is defined, runnable and tested in blocks/local.py (it registers the type too).
    argv = [sys.executable, str(repo / "blocks" / "local.py"), "--issuer", issuer, "--raw-uri", tiled_uri,
            "--secret-env", secret_env, "--grant-scope", os.environ.get("VISITFLOW_GRANT_SCOPE", "run")]
    if processed_uri:
        argv += ["--processed-uri", processed_uri]
    for key, value in (block_fields or {}).items():   # e.g. raw_template for blueapi's layout
        argv += [f"--{key.replace('_', '-')}", value]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ServiceFailed(f"saving the ScopedCredentials block failed:\n{proc.stderr[-3000:]}")
    run_cli(["--no-prompt", "deploy", "--all"], {**env, "VISITFLOW_ROOT": str(repo)}, cwd=repo)


def worker_query_seconds(worker_type: str | None) -> str:
    """How often the worker polls for runs: the warm worker's starts are sub-second, so a 1 s
    poll would dominate; the stock worker's child import dwarfs it."""
    return "0.25" if worker_type == "visitflow" else "1"


def worker_command(env: dict, *, health_port: int, name: str = "visitflow-local-worker", client_secret: str,
                   secret_env: str = "VISITFLOW_CLIENT_SECRET", worker_type: str | None = DEFAULT_WORKER_TYPE,
                   extra_env: dict | None = None, pool: str = POOL,
                   allowed_endpoints: tuple[str, ...] | None = None) -> tuple[list[str], dict, str]:
    """(argv, env, health URL) of a worker for ``pool``; the client secret reaches flow runs
    through its environment.

    Polls every 0.25 s (warm) or 1 s (stock); Prefect's default 10 s would be most of a live
    analysis' start latency.  Readiness is the worker's own health endpoint
    (``--with-healthcheck``).  ``allowed_endpoints``: the worker's own allow-list of issuers and
    Tiled URIs (``VISITFLOW_ALLOWED_ENDPOINTS``, :mod:`visitflow.core.endpoints`)."""
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
            "--with-healthcheck"]
    if worker_type:
        argv += ["--type", worker_type]
    env = {**env, secret_env: client_secret, "PREFECT_WORKER_QUERY_SECONDS": worker_query_seconds(worker_type),
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONUNBUFFERED": "1",
           "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
           **({ENDPOINTS_ENV: " ".join(allowed_endpoints)} if allowed_endpoints is not None else {}),
           **(extra_env or {})}
    return argv, env, f"http://127.0.0.1:{health_port}/health"


def start_worker(state: Path, env: dict, *, log_dir: Path | None = None, name: str = "visitflow-local-worker",
                 **kwargs) -> Service:
    """Start :func:`worker_command` as a service (keyword arguments as there)."""
    argv, wenv, health = worker_command(env, name=name, **kwargs)
    return start_service(name, argv, log_dir=log_dir or state / "logs", env=wenv, cwd=REPO, health_url=health)
