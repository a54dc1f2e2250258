"""The ``visitflow`` Prefect worker type: a process worker whose flow runs start warm.

``prefect worker start --pool P --type visitflow`` (registered through the
``prefect.collections`` entry point).  Everything a process worker does — job variables
(env, working dir), Prefect's run executor with crash detection, cancellation through the
control channel and process-group signals, logs to the API — is Prefect's own code; only the
*starter* differs: instead of spawning ``python -m prefect.engine`` (a cold interpreter
importing Prefect, numpy, tiled and the analysis: 11–20 s here), it asks the zygote
(:mod:`visitflow.worker.zygote`) to fork a pre-imported child.

Isolation is the process worker's: each flow run is its own process (and process group);
a crash in an analysis kills only that child, and the worker reports it as crashed.

The Prefect internals this needs (the run executor, the process handle) come from
:mod:`visitflow.worker.prefect_compat`, which checks them against the installed Prefect.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import anyio
import anyio.abc
from prefect.logging.loggers import get_worker_logger
from prefect.workers.process import ProcessJobConfiguration, ProcessVariables, ProcessWorker, ProcessWorkerResult

from prefect.exceptions import ObjectNotFound

from ..core import endpoints
from ..errors import EndpointNotAllowed
from .parent import Zygote, ZygoteStarter
from .prefect_compat import FlowRunExecutorContext

__all__ = ['VisitflowWorker']


class VisitflowWorker(ProcessWorker):
    """Process worker with warm, forked flow-run starts."""

    type = "visitflow"
    job_configuration = ProcessJobConfiguration
    job_configuration_variables = ProcessVariables
    _description = ("Runs visitflow analyses as forked children of a pre-imported parent: process isolation, "
                    "sub-second starts.")
    _documentation_url = "https://github.com/visitflow/visitflow"

    async def __aenter__(self):
        worker = await super().__aenter__()
        preload = [m for m in os.environ.get("VISITFLOW_WORKER_PRELOAD", "").split(",") if m]
        self._zygote = Zygote(preload)
        await anyio.to_thread.run_sync(self._zygote.start)
        get_worker_logger(self).info("visitflow zygote ready (pid %s, preload %.1fs)", self._zygote.proc.pid,
                          self._zygote.import_seconds or -1)
        return worker

    async def __aexit__(self, *exc_info):
        try:
            await super().__aexit__(*exc_info)
        finally:
            self._zygote.stop()

    async def _ensure_zygote(self) -> Zygote:
        if not self._zygote.alive():
            get_worker_logger(self).warning("visitflow zygote died; restarting it")
            self._zygote = Zygote(self._zygote.preload)
            await anyio.to_thread.run_sync(self._zygote.start)
        return self._zygote

    async def _check_endpoints(self, configuration: ProcessJobConfiguration) -> None:
        """Refuse a flow run whose job variables change a protected environment name (the
        allow-list, where Prefect is) or whose credentials Block names an endpoint off this
        worker's allow-list (:mod:`visitflow.core.endpoints`; issue 20 finding 3).  Raising
        here, before the run is submitted, makes Prefect mark it Crashed with this reason."""
        changed = endpoints.env_overrides(configuration.env or {})
        if changed:
            raise EndpointNotAllowed(
                f"job variables set {', '.join(changed)}: only the worker's own environment may (refused)")
        allow = endpoints.allowed()
        if allow is None:
            return
        name = (configuration.env or {}).get(endpoints.BLOCK_ENV) or os.environ.get(endpoints.BLOCK_ENV) \
            or endpoints.DEFAULT_BLOCK
        try:
            doc = await self.client.read_block_document_by_name(name, block_type_slug=endpoints.BLOCK_TYPE_SLUG)
        except ObjectNotFound:
            return   # the flow run fails on its own, saying which Block is missing; nothing is sent
        try:
            endpoints.check_block(doc.data, allow)
        except EndpointNotAllowed as exc:
            raise EndpointNotAllowed(f"credentials Block {name!r}: {exc}") from None

    async def run(self, flow_run, configuration: ProcessJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> ProcessWorkerResult:
        from prefect.flows import load_flow_from_flow_run

        if task_status is None:
            task_status = anyio.TASK_STATUS_IGNORED
        await self._check_endpoints(configuration)   # raises before anything starts: Crashed, with the reason
        zygote = await self._ensure_zygote()
        working_dir_ctx = (tempfile.TemporaryDirectory(suffix="prefect") if not configuration.working_dir
                           else contextlib.nullcontext(configuration.working_dir))
        execution = None
        with working_dir_ctx as working_dir, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as ctx:
                starter = ZygoteStarter(zygote, cwd=Path(working_dir).resolve(), env=configuration.env,
                                        control_channel=ctx.control_channel)
                executor = ctx.create_executor(flow_run, starter, resolve_flow=load_flow_from_flow_run,
                                               propose_submitting=False)

                async def execute(*, task_status=anyio.TASK_STATUS_IGNORED):
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as tg:
                    handle = await tg.start(execute)
                    task_status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))
