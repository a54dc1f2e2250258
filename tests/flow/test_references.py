"""The numpy references the end-to-end tests compare results with (tests/fixtures/references.py)
are worth comparing with: on data shaped like the tests' scans (visitflow/stack/sim.py) the
shipped analyses match them, a float32 implementation of the same statistics meets their
tolerance, and plausible wrong analyses do not."""

import math

import numpy as np
import pytest

from visitflow.flow import engine
from visitflow.flow.testing import MemoryRun, MemorySink, load_analyses

from tests.fixtures import references as ref
from tests.flow.test_testing import REPO

pytestmark = pytest.mark.analysts

SHIPPED = {name: load_analyses(REPO / f"flows/{name}.py")[name] for name in ("saxs_average", "peak_stats")}


def scan(num=15, shape=(16, 16), seed=0):
    """What tests/fixtures/scans.py's ``run_scan`` writes, in numpy: the motor from -2 to 2, a
    SynGauss detector (centre 0.3, sigma 0.6, 1000 counts, ±5 uniform noise) and float32
    ring images of ~10-110 counts."""
    rng = np.random.default_rng(seed)
    motor = np.linspace(-2.0, 2.0, num)
    det = 1000 * np.exp(-((motor - 0.3) ** 2) / (2 * 0.6 ** 2)) + rng.uniform(-5, 5, num)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    radius = shape[0] / 4 * (1 + 0.1 * motor)
    saxs = (100 * np.exp(-((r - radius[:, None, None]) ** 2) / 8) + rng.normal(10, 2, (num, *shape))).astype(np.float32)
    return {"motor": motor, "det": det, "saxs": saxs}


SCANS = [scan(), scan(num=12, seed=3), scan(num=30, seed=7), scan(num=40, seed=11)]


def live_and_post(name, data, **options):
    spec = SHIPPED[name].spec.with_options(options)
    data = {f: data[f] for f in spec.reads}
    n = len(next(iter(data.values())))
    post = engine.run_post(spec, MemoryRun(data, visible=n, finished=True), MemorySink())
    run, batches = MemoryRun(data), iter((1, 4, 9))
    live = engine.run_live(spec, run, MemorySink(), engine.LiveSettings(poll_interval=0, max_poll_interval=0),
                           sleep=lambda _: run.publish(next(batches, n)))
    return {"post": post, "live": live}


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("data", SCANS, ids=lambda d: f"n{len(d['motor'])}")
def test_the_shipped_analyses_match_the_references(name, data):
    want = ref.reference(name, data)
    for variant, got in live_and_post(name, data).items():
        ref.assert_matches(got, want, exact_keys=True, where=f"{variant}: ")
        ref.assert_matches(got, want, rtol=1e-10, atol=1e-12, where=f"{variant} (float64): ")


def test_peak_stats_reference_subtracts_the_background_and_skips_non_finite_points():
    data = scan()
    data["det"][[2, 9]] = [np.nan, np.inf]
    want = ref.peak_stats(data["det"], data["motor"], background=50.0)
    assert (want["frames"], want["skipped"]) == (15, 2)
    for variant, got in live_and_post("peak_stats", data, background=50.0).items():
        ref.assert_matches(got, want, exact_keys=True, where=f"{variant}: ")


# ------------------------------------------------------- float32 analyses meet the tolerance
def saxs_average_float32(saxs):
    frames = np.asarray(saxs, dtype=np.float32)
    return {"average": np.add.reduce(frames, axis=0, dtype=np.float32) / np.float32(len(frames))}


def peak_stats_float32(det, motor, background=0.0):
    x, y = np.asarray(motor, np.float32), np.asarray(det, np.float32) - np.float32(background)
    w = np.clip(y, 0, None)
    sw = w.sum(dtype=np.float32)
    c = (w * x).sum(dtype=np.float32) / sw
    sigma = np.sqrt((w * (x - c) ** 2).sum(dtype=np.float32) / sw)
    i = int(np.argmax(y))
    return {"centroid": c, "sigma": sigma, "fwhm": np.float32(2.3548200450309493) * sigma,
            "integral": np.trapezoid(y, x), "peak_position": x[i], "peak_value": y[i], "frames": x.size, "skipped": 0}


@pytest.mark.parametrize("data", SCANS, ids=lambda d: f"n{len(d['motor'])}")
def test_a_float32_analysis_meets_the_tolerance(data):
    ref.assert_matches(saxs_average_float32(data["saxs"]), ref.reference("saxs_average", data), exact_keys=True)
    ref.assert_matches(peak_stats_float32(data["det"], data["motor"]), ref.reference("peak_stats", data),
                       exact_keys=True)


# ------------------------------------------------------------ wrong analyses fail
WRONG = {
    "saxs_average": {
        "drops the last frame": lambda saxs: {"average": saxs[:-1].astype(np.float64).mean(axis=0)},
        "drops the first frame": lambda saxs: {"average": saxs[1:].astype(np.float64).mean(axis=0)},
        "median, not mean": lambda saxs: {"average": np.median(saxs, axis=0)},
        "divides by n - 1": lambda saxs: {"average": saxs.astype(np.float64).sum(axis=0) / (len(saxs) - 1)},
        "the last frame": lambda saxs: {"average": saxs[-1].astype(np.float64)},
    },
    "peak_stats": {
        "unweighted centroid": lambda det, motor: {**ref.peak_stats(det, motor), "centroid": float(np.mean(motor))},
        "rectangle integral": lambda det, motor: {**ref.peak_stats(det, motor),
                                                  "integral": float(det.sum() * (motor[1] - motor[0]))},
        "fwhm = 2 sigma": lambda det, motor: {**ref.peak_stats(det, motor),
                                              "fwhm": 2 * ref.peak_stats(det, motor)["sigma"]},
        "peak at the first point": lambda det, motor: {**ref.peak_stats(det, motor),
                                                       "peak_position": float(motor[0])},
        "a frame short": lambda det, motor: {**ref.peak_stats(det, motor), "frames": len(det) - 1},
        "last point lost": lambda det, motor: ref.peak_stats(det[:-1], motor[:-1]),
    },
}


@pytest.mark.parametrize("name,wrong", [(n, w) for n, ws in WRONG.items() for w in ws])
def test_a_wrong_analysis_fails_the_comparison(name, wrong):
    fn = WRONG[name][wrong]
    for data in SCANS:
        got = fn(**{f: data[f] for f in ref.READS[name]})
        with pytest.raises(AssertionError):
            ref.assert_matches(got, ref.reference(name, data))


def test_an_empty_reference_or_a_missing_output_fails():
    with pytest.raises(AssertionError):
        ref.assert_matches({"x": 1.0}, {})
    with pytest.raises(AssertionError):
        ref.assert_matches({"centroid": 0.3}, {"centroid": 0.3, "sigma": 0.6})
    with pytest.raises(AssertionError):
        ref.assert_matches({"centroid": 0.3, "extra": 1}, {"centroid": 0.3}, exact_keys=True)
    assert math.isnan(ref.peak_stats([-1.0, -2.0], [0.0, 1.0])["centroid"])   # no positive weight
