"""Simulated beamline devices for the demo, tests and benchmarks (ophyd.sim based).

A motor, a scalar detector with a Gaussian peak along the motor (for ``peak_stats``) and a
2-D SAXS-like detector (a ring whose radius follows the motor, plus noise — for
``saxs_average``).  Frames are produced in-event, so TiledWriter stores them as arrays in
Tiled itself; no external files to share between processes.
"""

from __future__ import annotations

import numpy as np
from ophyd.sim import SynAxis, SynGauss, SynSignal

__all__ = ['make_devices', 'motor_scan']


def make_devices(shape: tuple[int, int] = (64, 64), seed: int = 0, motor_delay: float = 0.0,
                 dtype: str = "float32"):
    """Return ``(motor, det, saxs)``."""
    motor = SynAxis(name="motor", delay=motor_delay)
    det = SynGauss("det", motor, "motor", center=0.3, Imax=1000, sigma=0.6, noise="uniform", noise_multiplier=5.0,
                   random_state=np.random.RandomState(seed))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)

    def image():
        radius = shape[0] / 4 * (1 + 0.1 * float(motor.readback.get()))
        ring = 100.0 * np.exp(-((r - radius) ** 2) / 8.0)
        return (ring + rng.normal(10.0, 2.0, size=shape)).astype(dtype)

    saxs = SynSignal(func=image, name="saxs", labels={"detectors"})
    return motor, det, saxs


def motor_scan(dets, motor, num: int, *, start: float = -2.0, stop: float = 2.0, delay: float = 0.0,
               md: dict | None = None):
    """A step scan of ``motor`` reading ``dets`` at each point, with an optional pause per
    point so live analysis sees frames trickle in (``bp.scan`` has no per-point delay)."""
    import bluesky.plan_stubs as bps
    from bluesky import preprocessors as bpp

    @bpp.run_decorator(md=md)
    @bpp.stage_decorator(list(dets) + [motor])
    def inner():
        for i in range(num):
            yield from bps.mv(motor, start + (stop - start) * i / max(num - 1, 1))
            yield from bps.trigger_and_read(list(dets) + [motor])
            if delay:
                yield from bps.sleep(delay)

    return (yield from inner())
