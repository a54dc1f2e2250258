"""A do-nothing flow for start-latency benchmarks (P1, P7): its body only sleeps.

With ``VISITFLOW_CHILD_PHASES`` set (see visitflow/worker/phases.py) it also appends when
its Running state was set (an ``on_running`` hook) and when its body began, with the
process's CPU so far: the end of the start-up breakdown in benchmarks/child_startup.py.
(Plain stdlib here: the stock process worker runs this flow too.)
"""

import json
import os
import time

from prefect import flow


def _mark(name: str) -> None:
    path = os.environ.get("VISITFLOW_CHILD_PHASES")
    if path:
        line = json.dumps({"pid": os.getpid(), "mark": [name, round(time.perf_counter(), 6),
                                                        round(time.process_time(), 6)]}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _on_running(flow, flow_run, state):
    _mark("running")


@flow(persist_result=False, on_running=[_on_running])
def probe(visit: str = "a1", run_id: str = "x", seconds: float = 0.0):
    _mark("body")
    time.sleep(seconds)
    return run_id
