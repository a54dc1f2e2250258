"""Which attempt of its flow run this process is, and how a superseded attempt stops.

The heartbeat automation (visitflow/production/ha_recovery.py) reschedules a live run whose
heartbeats stopped; if its host was only cut off, the old process is still alive and, when
its link returns, finds that Tiled refuses its writes (the fence, visitflow/tiled/live_fence.py).
It must then stop *without* reporting a state: the flow run is the same one (same id), now
Running under the later attempt, and a Failed or Crashed proposed by the old process would
end the attempt that is doing the work.  Prefect has exactly that exit: :class:`prefect.exceptions.Abort`
("the API says this run is not yours to finish") — the engine reports no state and tells the
worker the attempt was aborted by orchestration, so the worker does not mark it Crashed either.
What remains is a clear ERROR line in the flow run's logs naming both attempts.
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

from ..core.fence import Fence

__all__ = ['PATIENCE_SECONDS', 'current_attempt', 'superseded', 'stop_superseded']

log = logging.getLogger(__name__)


def _run_count(flow_run_id: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return int(client.read_flow_run(flow_run_id).run_count or 0)


def current_attempt(flow_run_id: str) -> int:
    """This attempt's number: the flow run's ``run_count`` as Prefect's server has it now
    (this process just moved it to Running, which counted it)."""
    try:
        return max(1, _run_count(flow_run_id))
    except Exception as exc:  # noqa: BLE001 - the engine just talked to the API; fall back to its copy
        from prefect import runtime

        log.warning("could not read this flow run's run_count (%s): using the engine's copy", exc)
        return max(1, int(runtime.flow_run.run_count or 0))


#: How long an attempt that hit an error keeps asking Prefect whether it was superseded
#: before reporting the error anyway (a host cut off for longer reports Failed late).
PATIENCE_SECONDS = 600.0


def superseded(fence: Fence, *, patience: float = PATIENCE_SECONDS, interval: float = 5.0,
               sleep=time.sleep, clock=time.monotonic) -> bool:
    """Whether a later attempt of this flow run has started — asked after an error (e.g. a
    connect error while this host is cut off), *before* this attempt reports Failed over the
    later one.  While Prefect cannot be asked (the same cut), keep asking: answering "no"
    then would let the old attempt's Failed land on the run the new attempt is finishing."""
    deadline = clock() + patience
    while True:
        try:
            return _run_count(fence.flow_run_id) > fence.attempt
        except Exception as exc:  # noqa: BLE001 - Prefect unreachable: ask again
            if clock() >= deadline:
                log.warning("could not ask Prefect whether %s was superseded (%s): reporting the error", fence, exc)
                return False
            sleep(interval)


def stop_superseded(logger, fence: Fence, reason: str) -> NoReturn:
    """Log why, then leave through Prefect's Abort (no state reported: see the module doc)."""
    from prefect.exceptions import Abort

    message = (f"this attempt ({fence}) stops: a later attempt of the same flow run owns the live "
               f"result ({reason}). It was rescheduled while this attempt was unreachable; no state "
               "is reported from here and nothing more is written.")
    logger.error(message)
    raise Abort(message)
