"""Run real bluesky scans (RunEngine + TiledWriter, simulated devices) as a given user."""

from __future__ import annotations

import threading
import time

from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter

from visitflow.stack.sim import make_devices, motor_scan
from visitflow.core.tiled_client import BearerAuth, connect


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


def held_scan(hold: threading.Event, pause_after: int, num: int = 16, step_sleep: float = 0.1,
              max_hold: float = 300.0):
    """A step-scan plan (``plan=`` of :func:`run_scan`) that stops after ``pause_after`` points
    until ``hold`` is set (at most ``max_hold`` s), so a test can restart or stop a server
    while the scan is certainly running; TiledWriter sends nothing meanwhile."""
    import bluesky.plan_stubs as bps
    from bluesky import preprocessors as bpp

    def plan(det, saxs, motor, md):
        @bpp.run_decorator(md=md)
        @bpp.stage_decorator([det, saxs, motor])
        def inner():
            for i in range(num):
                yield from bps.mv(motor, -1 + 2 * i / (num - 1))
                yield from bps.trigger_and_read([det, saxs, motor])
                yield from bps.sleep(step_sleep)
                waited = 0.0
                while i + 1 == pause_after and not hold.is_set() and waited < max_hold:
                    yield from bps.sleep(0.2)
                    waited += 0.2

        return (yield from inner())

    return plan
