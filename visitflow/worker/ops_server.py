"""The visitflow worker's ``/healthz``, ``/readyz`` and ``/metrics`` (``VISITFLOW_WORKER_OPS_PORT``).

Prefect's own worker health port (``--with-healthcheck``, ``/health``) says only that the
worker polled its work pool lately.  Ready, for a visitflow worker, also means that a flow
run can *start*: the zygote (:mod:`.parent`) is alive, and the Prefect API answers.

``/metrics`` (prometheus-client):

* ``visitflow_worker_start_seconds{variant}`` — from a flow run's expected start to its
  process running (what a user waits for before the first frame is analysed).
* ``visitflow_worker_running_runs{variant}`` — flow runs in progress (``live``: running live runs).
* ``visitflow_worker_runs_total{variant,outcome}``.
* ``visitflow_worker_heartbeat_timestamp_seconds`` — set every few seconds by the worker's
  event loop: the no-heartbeat alert fires when it stops moving.
* the flow runs' own series (:mod:`visitflow.flow.metrics`), collected from the multiprocess
  directory the zygote's children write to.

A WSGI app on a daemon thread (prometheus-client's own way to serve), not a second ASGI
server: the worker's event loop belongs to Prefect.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, CONTENT_TYPE_LATEST

__all__ = ['OPS_PORT_ENV', 'WorkerOps']

OPS_PORT_ENV = "VISITFLOW_WORKER_OPS_PORT"


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # probes every few seconds: not worth a log line each
        pass


class WorkerOps:
    def __init__(self, port: int, *, zygote_alive, prefect_api_url: str | None, host: str = "127.0.0.1"):
        self.zygote_alive, self.prefect_api_url = zygote_alive, prefect_api_url
        self.multiproc_dir = tempfile.mkdtemp(prefix="visitflow-worker-metrics-")
        self.registry = CollectorRegistry()
        self.start_seconds = Histogram("visitflow_worker_start_seconds", "Expected start to process running",
                                       ["variant"], registry=self.registry,
                                       buckets=(.1, .25, .5, 1, 2, 5, 10, 20, 30, 60, 120))
        self.running = Gauge("visitflow_worker_running_runs", "Flow runs in progress", ["variant"],
                             registry=self.registry)
        self.runs = Counter("visitflow_worker_runs", "Flow runs finished", ["variant", "outcome"],
                            registry=self.registry)
        self.heartbeat = Gauge("visitflow_worker_heartbeat_timestamp_seconds", "Worker event loop heartbeat",
                               registry=self.registry)
        for variant in ("live", "post"):
            self.running.labels(variant).set(0)
        self.heartbeat.set(time.time())
        self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_Quiet)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="visitflow-worker-ops").start()

    # -- what the worker tells us ------------------------------------------------------
    def started(self, variant: str, expected_start: float | None) -> None:
        self.running.labels(variant).inc()
        if expected_start is not None:
            self.start_seconds.labels(variant).observe(max(0.0, time.time() - expected_start))

    def finished(self, variant: str, outcome: str, pid: int | None) -> None:
        self.running.labels(variant).dec()
        self.runs.labels(variant, outcome).inc()
        if pid is not None:
            from prometheus_client import multiprocess

            try:  # its live gauges go with it
                multiprocess.mark_process_dead(pid, self.multiproc_dir)
            except OSError:
                pass

    def beat(self) -> None:
        self.heartbeat.set(time.time())

    def close(self) -> None:
        self._server.shutdown()
        shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    # -- HTTP ----------------------------------------------------------------------------
    def _ready(self) -> tuple[bool, dict]:
        checks = {}
        alive = bool(self.zygote_alive())
        checks["zygote"] = {"ok": alive, "detail": "alive" if alive else "the zygote is not running: no run can start"}
        if self.prefect_api_url:
            try:
                r = httpx.get(f"{self.prefect_api_url.rstrip('/')}/health", timeout=10)
                checks["prefect-api"] = {"ok": r.status_code == 200,
                                         "detail": f"{self.prefect_api_url} answered {r.status_code}"}
            except httpx.HTTPError as exc:
                checks["prefect-api"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
        ready = all(c["ok"] for c in checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        if not ready:
            body["failing"] = sorted(n for n, c in checks.items() if not c["ok"])
        return ready, body

    def _metrics(self) -> bytes:
        from prometheus_client import multiprocess

        children = CollectorRegistry()
        multiprocess.MultiProcessCollector(children, path=self.multiproc_dir)
        return generate_latest(self.registry) + generate_latest(children)

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            status, body, ctype = "200 OK", json.dumps({"status": "ok"}).encode(), "application/json"
        elif path == "/readyz":
            ready, doc = self._ready()
            status, body, ctype = ("200 OK" if ready else "503 Service Unavailable"), json.dumps(doc).encode(), \
                "application/json"
        elif path == "/metrics":
            status, body, ctype = "200 OK", self._metrics(), CONTENT_TYPE_LATEST
        else:
            status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]


def ops_port() -> int | None:
    value = os.environ.get(OPS_PORT_ENV)
    return int(value) if value else None


__all__.append('ops_port')
