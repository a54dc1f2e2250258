"""A do-nothing flow for start-latency benchmarks (P1, P7): its body only sleeps."""

import time

from prefect import flow


@flow(persist_result=False)
def probe(visit: str = "a1", run_id: str = "x", seconds: float = 0.0):
    time.sleep(seconds)
    return run_id
