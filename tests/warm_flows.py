"""Small flows for the warm-worker tests: one that works and logs, one that dies, one that waits."""

import os
import time

from prefect import flow, get_run_logger


@flow
def hello(x: int = 1) -> int:
    get_run_logger().info("hello from pid %s with x=%s", os.getpid(), x)
    return x * 2


@flow
def crash():
    os._exit(17)  # no exception, no cleanup: the process just dies


@flow
def sleepy(seconds: float = 60):
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
