"""The parent side of warm starts: the zygote process and Prefect's process starter for it.

:class:`Zygote` owns one pre-imported interpreter (:mod:`visitflow.worker.zygote` is the code
that runs in it) and the bookkeeping of the children it forks; :class:`ZygoteStarter` is the
``ProcessStarter`` the worker hands Prefect's run executor, so that everything else (crash
detection, cancellation, logs) stays Prefect's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from prefect.settings import get_current_settings
from prefect.utilities.processutils import sanitize_subprocess_env

from ..errors import ZygoteDied
from .prefect_compat import ProcessHandle, process_group_handle

__all__ = ['ForkedChild', 'Zygote', 'ZygoteStarter']


@dataclass
class ForkedChild:
    """What Prefect's ProcessHandle needs of a process: pid and returncode."""

    pid: int
    returncode: int | None = None


class Zygote:
    """Owns the zygote process and the bookkeeping of its children (thread-safe)."""

    def __init__(self, preload: list[str] | None = None):
        self.preload = preload or []
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._started: dict[int, tuple[threading.Event, dict]] = {}
        self._exits: dict[int, tuple[threading.Event, dict]] = {}
        self.import_seconds: float | None = None
        self._preloaded = False   # the zygote said "ready" (its stdout may also close without it)

    def start(self, timeout: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visitflow.worker.zygote", *self.preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1,
            start_new_session=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, ready), daemon=True, name="zygote-reader").start()
        if not ready.wait(timeout):
            raise ZygoteDied(f"zygote not ready after {timeout}s")
        if not self._preloaded:
            # Its stdout closed before "ready": it is exiting, though poll() may not show it yet.
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            raise ZygoteDied(f"zygote exited with {self.proc.returncode} during preload")
        if self.proc.poll() is not None:
            raise ZygoteDied(f"zygote exited with {self.proc.returncode} during preload")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _read(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                self.import_seconds = msg.get("import_seconds")
                self._preloaded = True
                ready.set()
            elif "id" in msg:
                with self._lock:
                    event, box = self._started.get(msg["id"], (None, None))
                if event is not None:
                    box.update(msg)
                    event.set()
            elif "code" in msg:
                with self._lock:
                    entry = self._exits.setdefault(msg["pid"], (threading.Event(), {}))
                entry[1].update(msg)
                entry[0].set()
        ready.set()
        with self._lock:  # zygote gone: release everyone waiting
            for event, box in list(self._started.values()):
                box.setdefault("error", "zygote exited")
                event.set()

    def fork(self, flow_run_id: str, env: dict, cwd: str | None, timeout: float = 30) -> ForkedChild:
        with self._lock:
            if not self.alive():
                raise ZygoteDied("the zygote is not running")
            self._next += 1
            rid = self._next
            event, box = threading.Event(), {}
            self._started[rid] = (event, box)
            self.proc.stdin.write(json.dumps({"id": rid, "flow_run_id": flow_run_id, "env": env, "cwd": cwd}) + "\n")
            self.proc.stdin.flush()
        try:
            if not event.wait(timeout) or "pid" not in box:
                raise ZygoteDied(box.get("error", "no answer from the zygote"))
        finally:
            with self._lock:
                self._started.pop(rid, None)
        pid = box["pid"]
        with self._lock:
            self._exits.setdefault(pid, (threading.Event(), {}))
        return ForkedChild(pid)

    def wait(self, child: ForkedChild) -> int:
        event, box = self._exits[child.pid]
        while not event.wait(0.5):
            if not self.alive() and not event.is_set():
                # The zygote died: its children are reparented and unreported. Poll the pid.
                try:
                    os.kill(child.pid, 0)
                except ProcessLookupError:
                    box.setdefault("code", -1)
                    break
        with self._lock:
            self._exits.pop(child.pid, None)
        child.returncode = int(box.get("code", -1))
        return child.returncode

    def stop(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ZygoteStarter:
    """A Prefect ``ProcessStarter`` that forks the run from the zygote."""

    def __init__(self, zygote: Zygote, *, cwd: Path, env: dict, control_channel=None):
        self.zygote, self.cwd, self.env, self.control_channel = zygote, cwd, env, control_channel

    async def start(self, flow_run, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED):
        control_env: dict[str, str] = {}
        registered = False
        if self.control_channel is not None:
            try:
                port, token = self.control_channel.register(flow_run.id)
                control_env = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
                registered = True
            except RuntimeError:
                pass
        env: dict[str, Any] = dict(os.environ)
        env.update(self.env)
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        env.update({"PREFECT__FLOW_RUN_ID": str(flow_run.id), "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
                    **control_env})
        env = {k: v for k, v in sanitize_subprocess_env(env).items() if v is not None}
        handed_off = False
        try:
            child = await anyio.to_thread.run_sync(self.zygote.fork, str(flow_run.id), env, str(self.cwd))
            handle = process_group_handle(child)
            task_status.started(handle)
            handed_off = True
            await anyio.to_thread.run_sync(self.zygote.wait, child, abandon_on_cancel=True)
        except BaseException:
            if registered and not handed_off:
                self.control_channel.unregister(flow_run.id)
            raise
