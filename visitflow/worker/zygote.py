"""The warm parent ("zygote") of the visitflow worker: imports once, forks per flow run.

Most of a process worker's 11–20 s start latency is a fresh Python importing Prefect,
numpy, tiled and the analysis.  The zygote pays that once, then stays *single-threaded*
(so ``fork`` is safe: no other thread can hold a lock the child would inherit) and forks a
child per flow run.  The child starts its own session (so cancellation can signal its whole
process group), takes the run's environment and working directory, and runs exactly what
``python -m prefect.engine`` runs (:func:`visitflow.worker.prefect_compat.run_flow_run`).  A crashing child cannot hurt the zygote or the worker;
the exit code reaches the worker, which reports a crash like the process worker does.

What stays per child is what belongs to the run or cannot cross a fork: reading the run and
its deployment, the pull step, executing the flow's entrypoint file (Prefect re-executes it
in every child, so a changed deployment is never run stale; the zygote never imports a flow's
own code), clients, the engine's loop thread.  Modules Prefect imports lazily on every run
are imported here once (:data:`RUN_PRELOAD`); ``VISITFLOW_CHILD_PHASES`` makes each child
record its per-phase CPU and wall time (:mod:`.phases`, benchmarks/child_startup.py).

Protocol (JSON lines): stdin ``{"id", "flow_run_id", "env", "cwd"}``; stdout
``{"id", "pid"}`` when forked, ``{"pid", "code"}`` when a child exits, ``{"ready": true,
"import_seconds"}`` once at start.  Child output goes to the zygote's stderr (the worker log).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import threading
import time

from . import phases
from .prefect_compat import drain_run_services, run_flow_run

__all__ = ['PRELOAD', 'RUN_PRELOAD', 'WARM_ENV', 'warm', 'run_flow_run', 'main']

PRELOAD = (
    "numpy", "httpx", "jwt", "prefect", "prefect.flow_engine", "prefect.engine", "prefect.blocks.system",
    "prefect.artifacts", "prefect.concurrency.sync", "tiled.client", "visitflow.flow.builder", "visitflow.flow.credentials",
    "visitflow.flow.source", "visitflow.flow.sink", "visitflow.core.tiled_client", "pandas", "PIL.Image",
)

#: What every forked child still imported for itself after PRELOAD (measured: the modules a
#: child's ``sys.modules`` gained over one probe run, benchmarks/child_startup.py, issue 22):
#: Prefect imports these lazily on each run -- pydantic.v1 to validate flow parameters and
#: when flows/ are decorated, anyio's asyncio backend and streams for the engine's loop
#: thread, idna for the API URL, rich's emoji table for log formatting -- plus
#: visitflow.options, which flows/ import.  Pure imports: nothing here starts a thread,
#: opens a socket or reads a deployment, so they are as fork-safe as PRELOAD.
#: ``VISITFLOW_ZYGOTE_WARM=0`` skips them (the "before" of that benchmark).
RUN_PRELOAD = (
    "pydantic.v1", "pydantic.v1.decorator", "anyio._backends._asyncio", "anyio.streams.memory",
    "anyio.streams.stapled", "anyio.streams.tls", "encodings.idna", "stringprep", "rich._emoji_codes",
    "visitflow.options",
)
WARM_ENV = "VISITFLOW_ZYGOTE_WARM"


def warm() -> bool:
    return os.environ.get(WARM_ENV, "1").strip().lower() not in ("0", "false", "no")


def _child(request: dict, requested_at: float | None = None) -> None:
    """In the forked child: become the flow run's process, never return."""
    code = 1
    phases.start(_PHASES, requested_at)
    try:
        os.setsid()
        os.dup2(2, 1)  # prints go to the worker log, not into the protocol pipe
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the protocol pipe belongs to the zygote
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update({k: v for k, v in request["env"].items() if v is not None})
        if request.get("cwd"):
            os.chdir(request["cwd"])
        phases.mark("env")
        code = run_flow_run(request["flow_run_id"], share_client=_WARM)
    except BaseException:  # noqa: BLE001 - report, then exit with a failure code
        import traceback

        traceback.print_exc()
    finally:
        try:
            drain_run_services()   # os._exit skips Prefect's own drain at exit: logs would be lost
            phases.mark("drained")
            phases.write()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


#: where children record their phases (:mod:`.phases`); read once, before a child replaces its environment
_PHASES = os.environ.get(phases.ENV)
_WARM = warm()


def _emit(message: dict) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")
    sys.__stdout__.flush()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _emit({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> int:
    t0 = time.monotonic()
    for module in PRELOAD + (RUN_PRELOAD if _WARM else ()) + tuple(a for a in sys.argv[1:] if a):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs speed
            print(f"visitflow zygote: could not preload {module}: {exc}", file=sys.stderr)
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:  # fork would copy locks held by these: refuse rather than deadlock later
        print(f"visitflow zygote: threads started during preload: {threads}", file=sys.stderr)
        return 3
    _emit({"ready": True, "import_seconds": round(time.monotonic() - t0, 3), "pid": os.getpid()})
    sel = selectors.DefaultSelector()
    fd = sys.stdin.fileno()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    while True:
        events = sel.select(timeout=0.05)
        _reap()
        if not events:
            continue
        # Raw reads, split here: ``sys.stdin.readline()`` would pull every request the worker
        # wrote at once into Python's buffer and return only the first, and select() would not
        # wake for the rest (the pipe is empty) -- a burst of forks left all but the first
        # unanswered ("no answer from the zygote", seen with three concurrent post runs).
        data = os.read(fd, 1 << 16)
        if not data:  # worker went away: exit; running children continue on their own
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            requested_at = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                sel.close()
                _child(request, requested_at)
            _emit({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
