"""Starting and stopping the local servers (IdP, Tiled, Prefect, worker) as process groups.

Used by the test fixtures and by ``visitflow up``: each service is a child in its own
process group (so stopping it also stops whatever it spawned — uvicorn workers, a Prefect
worker's flow-run children), logs go to a file (a pipe that nobody drains is how Prefect's
``--background`` mode dies), and readiness is an HTTP health check, polled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import ServiceFailed

__all__ = [ 'free_port', 'Service', 'stop_group', 'start_service']


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    argv: list[str]
    log_path: Path
    health_url: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> float:
        """Poll ``health_url`` until it answers 200; returns seconds waited."""
        t0 = time.monotonic()
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health_url:
                try:
                    if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
            elif time.monotonic() - t0 > 1.0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise ServiceFailed(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(interval)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the service's process group: its leader first, then what is left (:func:`stop_group`)."""
        if self.process is None or self.process.poll() is not None:
            return
        stop_group(self.process.pid, timeout, reap=self.process.poll)   # poll: keeps its exit status
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def stop_group(pgid: int, timeout: float = 15.0, reap=None) -> None:
    """Stop process group ``pgid``: SIGTERM its leader first and give it ``timeout`` seconds
    to stop its own children; then SIGTERM, and 5 s later SIGKILL, whatever of the group is left.

    Why the leader first: a server that supervises children stops them in order on SIGTERM
    (uvicorn's shutdown, then its workers).  Signalling the whole group at once kills those
    children under it, and blueapi 1.21.1 then hangs in its shutdown waiting on its worker
    subprocess until SIGKILL (17 s per stop, measured; 3 s with the leader first).

    ``reap``: how to reap the leader if it is our child (a zombie leader keeps the group
    alive); by default ``waitpid``, which loses its exit status -- :meth:`Service.stop` passes
    its ``Popen.poll``."""
    reap = reap or (lambda: _waitpid_nohang(pgid))
    deadline = time.monotonic() + timeout
    if _signal(lambda: os.kill(pgid, signal.SIGTERM)):
        _wait_gone(lambda: os.kill(pgid, 0), reap, deadline)
    for sig, until in ((signal.SIGTERM, max(deadline, time.monotonic() + 1)), (signal.SIGKILL, None)):
        if not _signal(lambda: os.killpg(pgid, sig)):
            return
        if _wait_gone(lambda: os.killpg(pgid, 0), reap, until or time.monotonic() + 5):
            return


def _signal(send) -> bool:
    """``send()``; False if there was nothing left to signal."""
    try:
        send()
        return True
    except ProcessLookupError:
        return False


def _waitpid_nohang(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:   # not our child: init reaps it
        pass


def _wait_gone(probe, reap, deadline: float) -> bool:
    """Poll until ``probe()`` finds nothing (True) or ``deadline`` passes (False), reaping the
    leader each time (``reap``)."""
    while time.monotonic() < deadline:
        reap()
        if not _signal(probe):
            return True
        time.sleep(0.1)
    return False


def start_service(name: str, argv: list[str], *, log_dir: Path, health_url: str | None = None,
                  env: dict | None = None, cwd: str | Path | None = None) -> Service:
    """Start ``argv`` in a new process group with output to ``log_dir/<name>.log``."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
    return Service(name, argv, log_path, health_url, proc)
