"""Run real bluesky scans (RunEngine + TiledWriter, simulated devices) as a given user."""

from __future__ import annotations

import threading
import time

from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter

from visitflow.sim import make_devices, motor_scan
from visitflow.tiled.client import BearerAuth, connect


def user_root(tiled_uri: str, token: str):
    return connect(tiled_uri, BearerAuth(lambda: token))


def run_scan(tiled_uri: str, token: str, visit: str = "a1", num: int = 20, shape=(16, 16), delay: float = 0.0,
             seed: int = 0, subscribers=(), md: dict | None = None, plan=None) -> str:
    """Write one run into raw/<visit>/<uid> with TiledWriter; returns the uid."""
    root = user_root(tiled_uri, token)
    motor, det, saxs = make_devices(shape, seed=seed)
    RE = RunEngine({}, context_managers=[])  # no SIGINT handler: may run in a thread
    RE.subscribe(TiledWriter(root["raw"][visit], batch_size=1))
    for cb in subscribers:
        RE.subscribe(cb)
    md = {"instrument_session": visit, **(md or {})}
    plan = plan(det, saxs, motor, md) if plan else motor_scan([det, saxs], motor, num, delay=delay, md=md)
    (uid,) = RE(plan)
    return uid


def start_scan_thread(*args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``run_scan`` in a thread; the dict gets ``uid`` (or ``error``) when it ends."""
    out: dict = {}

    def target():
        try:
            out["uid"] = run_scan(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            out["error"] = exc
        out["ended"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out
