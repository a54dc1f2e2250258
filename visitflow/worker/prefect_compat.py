"""Every private Prefect name visitflow relies on, in one place, checked when it is imported.

The warm worker (visitflow/worker/worker.py, visitflow/worker/zygote.py) changes only how
Prefect's process worker *starts* a flow run: it forks a pre-imported child instead of
spawning ``python -m prefect.engine``.  Everything around the start stays Prefect's own code,
and some of that code is not exported: the run executor with its crash detection and
cancellation (``prefect.runner._flow_run_executor``), the process handle and process-group
termination (``prefect.runner._process_manager``), and what ``prefect.engine``'s ``__main__``
does in the child (control-channel setup, run metrics, driving generator flows).  Those names
can change in any Prefect release, so no other visitflow module imports them (a test in
tests/worker/test_prefect_compat.py checks the source of every module) and this one resolves them
all at import:

* a name that is **missing** raises :class:`~visitflow.errors.PrefectIncompatible` naming
  every missing name, the installed Prefect and the tested range: the worker refuses to start
  with that message instead of failing with an ``AttributeError`` in the middle of a run.
  The way out meanwhile is Prefect's own ``process`` worker type (cold starts, same flows).
* a Prefect **outside the tested range** whose names all resolve gets a
  :class:`~visitflow.errors.PrefectVersionWarning` naming the names at risk.  A warning, not
  an error: ``pip install visitflow`` resolves the newest Prefect that pyproject allows, and
  most releases keep these names (3.8.8 → 3.9.1 kept all of them); refusing would break every
  new install the day Prefect publishes a release that changed nothing we use, and keep
  facilities off Prefect's fixes.  What catches a real break is CI: tests/worker/test_prefect_compat.py
  resolves every name below (and the parameters we pass) on the installed Prefect, and
  ``.ci/run-unconstrained`` runs it with the warm-worker and end-to-end tests in an install
  without constraints — what a new user gets.  ``VISITFLOW_STRICT_PREFECT=1`` in the
  worker's environment makes it :class:`~visitflow.errors.PrefectIncompatible` for whoever
  prefers that.

``TESTED`` moves with ``constraints.txt``; raise it only after the unconstrained job passed.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

from ..core import compat as _compat
from ..errors import PrefectIncompatible, PrefectVersionWarning
from . import phases

__all__ = [ 'TESTED', 'PrivateName', 'PRIVATE_NAMES',
    'UNDERSCORE_ATTRIBUTES', 'installed_prefect', 'is_tested', 'resolve', 'check', 'at_risk',
    'ProcessHandle', 'FlowRunExecutorContext', 'process_group_handle', 'run_flow_run', 'drain_run_services']

#: Prefect releases the warm worker was tested on (pip specifier syntax).
TESTED = ">=3.9.1,<3.10"


@dataclass(frozen=True)
class PrivateName:
    """``module`` + ``name`` (dotted for a member of a class), the keyword ``parameters`` we
    pass to it, and why we need it."""

    module: str
    name: str
    why: str
    parameters: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    PrivateName("prefect.runner._flow_run_executor", "FlowRunExecutorContext",
                "Prefect's own run executor (state proposals, crash detection, cancellation) around our starter"),
    PrivateName("prefect.runner._flow_run_executor", "FlowRunExecutorContext.create_executor",
                "builds the executor for one flow run with our starter",
                ("flow_run", "starter", "resolve_flow", "propose_submitting")),
    PrivateName("prefect.runner._flow_run_executor", "FlowRunExecutor.submit",
                "starts the run through the starter and waits for its exit code", ("task_status",)),
    PrivateName("prefect.runner._flow_run_executor", "FlowRunExecutionResult",
                "the executor's result: status_code and handle"),
    PrivateName("prefect.runner._control_channel", "ControlChannel.register",
                "gives the forked run the control port and token for graceful cancellation"),
    PrivateName("prefect.runner._control_channel", "ControlChannel.unregister",
                "releases that registration when the fork failed"),
    PrivateName("prefect.runner._process_manager", "ProcessHandle",
                "what a starter hands the executor: pid, returncode, kill", ("termination_scope",)),
    PrivateName("prefect.runner._process_manager", "_PosixProcessGroupTerminationScope",
                "cancellation signals the forked run's whole process group"),
    PrivateName("prefect._internal.control_listener", "configure_from_env",
                "the forked child takes the control channel from its environment, as prefect.engine does"),
    PrivateName("prefect._internal.metrics", "RunMetrics",
                "the run metrics prefect.engine records around a flow run"),
    PrivateName("prefect.engine", "_drive_run_flow_result",
                "runs generator and async flows to the end, as prefect.engine does"),
)

#: Underscore class attributes of Prefect base classes that visitflow *sets* in its own
#: classes.  Prefect documents these as how a worker type or a block type describes itself
#: (so they stay in those classes' bodies), but an upgrade could still rename one; the test
#: checks each exists on the base class.
UNDERSCORE_ATTRIBUTES: tuple[PrivateName, ...] = tuple(
    PrivateName(module, f"{cls}.{attr}", why) for module, cls, attrs, why in (
        # (``_display_name``, which ProcessWorker still sets, is read by nothing in Prefect 3.9)
        ("prefect.workers.base", "BaseWorker", ("_description", "_documentation_url"),
         "the visitflow worker type's card in the UI (visitflow/worker/worker.py)"),
        ("prefect.blocks.core", "Block",
         ("_block_type_name", "_block_type_slug", "_description", "_documentation_url", "_logo_url"),
         "the ScopedCredentials block type's name, slug and card (visitflow/flow/credentials.py)"),
    ) for attr in attrs
)


def installed_prefect() -> str:
    return _compat.installed("prefect")


def is_tested(version: str, tested: str = TESTED) -> bool:
    return _compat.is_tested(version, tested)


def _lookup(entry: PrivateName) -> Any:
    return _compat.lookup(entry.module, entry.name)


def resolve(entry: PrivateName) -> Any:
    """The object ``entry`` names; ``LookupError`` (with what is wrong) if it is missing or no
    longer takes the parameters we pass."""
    try:
        obj = _lookup(entry)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"{entry.qualname} is missing ({exc})") from None
    if entry.parameters:
        try:
            accepted = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            accepted = {}
        lost = [p for p in entry.parameters if p not in accepted]
        if lost:
            raise LookupError(f"{entry.qualname} no longer takes {', '.join(lost)}")
    return obj


def check(entries=PRIVATE_NAMES, version: str | None = None) -> dict[str, Any]:
    """Resolve every entry; raise one :class:`PrefectIncompatible` naming all that fail."""
    resolved, problems = _compat.resolve_all(entries, resolve)
    if problems:
        raise PrefectIncompatible(
            f"visitflow's warm worker cannot run on prefect {version or installed_prefect()} (tested: {TESTED}); "
            "private Prefect names it relies on changed:\n" + "\n".join(problems) +
            "\nUse Prefect's own `process` worker type meanwhile, or install a tested Prefect "
            "(pip install -c constraints.txt ...).")
    return resolved


def at_risk() -> str:
    return ", ".join(e.qualname for e in PRIVATE_NAMES + UNDERSCORE_ATTRIBUTES)


def _check_version() -> None:
    version = installed_prefect()
    if is_tested(version):
        return
    text = (f"prefect {version} is outside the range visitflow's warm worker was tested on ({TESTED}); "
            f"every private name it relies on is present, but their behaviour may have changed: {at_risk()}. "
            "Run tests/worker/test_prefect_compat.py and tests/worker/test_warm_worker.py on this install "
            "(.ci/run-unconstrained) before relying on it.")
    if os.environ.get("VISITFLOW_STRICT_PREFECT", "").lower() in ("1", "true", "yes"):
        raise PrefectIncompatible(text + " (VISITFLOW_STRICT_PREFECT is set)")
    warnings.warn(PrefectVersionWarning(text), stacklevel=3)


_NAMES = check()
_check_version()

ProcessHandle = _NAMES["prefect.runner._process_manager.ProcessHandle"]
FlowRunExecutorContext = _NAMES["prefect.runner._flow_run_executor.FlowRunExecutorContext"]


def process_group_handle(child) -> Any:
    """A ``ProcessHandle`` for a forked child that leads its own process group (the zygote's
    children call ``setsid``): cancellation signals the whole group."""
    scope = _NAMES["prefect.runner._process_manager._PosixProcessGroupTerminationScope"]
    return ProcessHandle(child, termination_scope=scope())


def run_flow_run(flow_run_id: str, share_client: bool = True) -> int:
    """What ``python -m prefect.engine <id>`` does (the ``__main__`` of ``prefect.engine``), in the
    forked child; returns the exit code.

    ``share_client``: one sync Prefect client for reading the run and for the engine
    (Prefect's public ``SyncClientContext``, which both ``load_flow_run``'s ``get_client`` and
    the engine's ``SyncClientContext.get_or_create`` reuse), instead of one each: a client
    costs an SSL context from certifi's bundle (~20 ms CPU here, even for an http API) and a
    new connection.  The same calls on the same API; only the second client is saved."""
    import contextlib
    from uuid import UUID

    from prefect.context import SyncClientContext
    from prefect.engine import handle_engine_signals

    _NAMES["prefect._internal.control_listener.configure_from_env"]()
    phases.mark("control")
    run_id = UUID(flow_run_id)
    try:
        with handle_engine_signals(run_id), (SyncClientContext() if share_client else contextlib.nullcontext()):
            from prefect.flow_engine import flow_run_logger, load_flow, load_flow_run, run_flow

            flow_run = load_flow_run(flow_run_id=run_id)
            phases.mark("load_flow_run")
            run_logger = flow_run_logger(flow_run=flow_run)
            try:
                flow = load_flow(flow_run)
                phases.mark("load_flow")
            except Exception:
                run_logger.error("Unexpected exception encountered when trying to load flow", exc_info=True)
                raise
            with _NAMES["prefect._internal.metrics.RunMetrics"](flow_run, flow):
                result = run_flow(flow, flow_run=flow_run, error_logger=run_logger)
                _NAMES["prefect.engine._drive_run_flow_result"](flow, result)
            phases.mark("run_flow")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def drain_run_services(timeout: float = 10) -> None:
    """Send what the flow run's Prefect services still hold (its logs, its events) before the
    forked child leaves with ``os._exit``.

    A plain ``python -m prefect.engine`` drains them at interpreter exit (Prefect registers
    the drain with ``threading._register_atexit``); ``os._exit`` skips that, so a run's last
    log lines ("complete", "live source", "done") were lost whenever they were still queued
    -- under load, most of a live run's.  Public classes, each ``drain_all(timeout)``."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort on the way out; the run's state is already set
            pass
