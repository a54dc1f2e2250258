"""Helpers for the ``stream`` suite: follow a real scan live with a run-bound data token."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

from visitflow.flow import engine
from visitflow.core.tiled_client import BearerAuth, connect
from visitflow.flow.source import TiledRawRun
from visitflow.flow.push import PushRawRun

from .memory_run import MemorySink
from .scans import start_scan_thread

FLOWS = Path(__file__).resolve().parents[1] / "flows"


def spec_of(analysis: str):
    if str(FLOWS) not in sys.path:
        sys.path.insert(0, str(FLOWS))
    return getattr(__import__(analysis), analysis).spec


class StartCapture:
    """A RunEngine subscriber that records the run uid at the start document."""

    def __init__(self):
        self.uid = None
        self.started = threading.Event()

    def __call__(self, name, doc):
        if name == "start":
            self.uid = doc["uid"]
            self.started.set()


def scan_in_thread(tiled_uri, token, **kwargs):
    cap = StartCapture()
    thread, out = start_scan_thread(tiled_uri, token, subscribers=[cap], **kwargs)
    assert cap.started.wait(60), out
    return cap, thread, out


def push_source(tiled_uri: str, data_token: str, visit: str, uid: str, spec, **kwargs) -> PushRawRun:
    root = connect(tiled_uri, BearerAuth(lambda: data_token))
    run_node = wait_for_node(root, f"raw/{visit}/{uid}")
    return PushRawRun(TiledRawRun(run_node, spec.reads, spec.stream), lambda: data_token, **kwargs)


def wait_for_node(root, path: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return root[path]
        except KeyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def follow(source, spec, sink=None, **settings):
    """run_live over ``source``; returns (outputs, sink)."""
    sink = sink or MemorySink()
    options = dict(poll_interval=0.2, max_poll_interval=1.0, idle_timeout=120.0, max_batch=64)
    options.update(settings)
    outputs = engine.run_live(spec, source, sink, engine.LiveSettings(**options))
    return outputs, sink


def numpy_answer(spec, tiled_uri: str, token: str, visit: str, uid: str) -> dict:
    root = connect(tiled_uri, BearerAuth(lambda: token))
    stream = root[f"raw/{visit}/{uid}"][spec.stream]
    return spec.compute({f: np.asarray(stream[f].read()) for f in spec.reads})


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(got[k], dtype=float), np.asarray(v, dtype=float), rtol=1e-9,
                                   err_msg=k)
