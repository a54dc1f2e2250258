"""The shipped analyses against a float64 numpy reference on beamline-like data — energies
of 10–12 keV in eV, motor offsets of 4.5–6.3 mm, 1e5–1e6 counts on a large baseline, float32
detector frames — live and post alike; and edge scans (empty, aborted, NaN frames) end the
same way in both variants."""

import math

import numpy as np
import pytest

from visitflow.flow import engine
from visitflow.flow.testing import MemoryRun, MemorySink, assert_check, load_analyses

from tests.flow.test_testing import REPO

pytestmark = pytest.mark.analysts

peak_stats = load_analyses(REPO / "flows/peak_stats.py")["peak_stats"]
saxs_average = load_analyses(REPO / "flows/saxs_average.py")["saxs_average"]
RTOL = 1e-10


def energy_scan(n=801, seed=1):
    """A narrow peak (sigma 0.35 eV) on an energy axis near 11.1 keV, 1e5 baseline, Poisson-ish noise."""
    rng = np.random.default_rng(seed)
    x = np.linspace(11095.0, 11105.0, n)
    y = 1e5 + 9e5 * np.exp(-(x - 11100.3) ** 2 / (2 * 0.35 ** 2))
    return {"motor": x, "det": rng.normal(y, np.sqrt(y))}


def motor_scan(n=500, seed=2):
    rng = np.random.default_rng(seed)
    x = np.linspace(4.5, 6.3, n) + rng.normal(0, 2e-5, n)  # encoder jitter
    y = 3e5 + 7e5 * np.exp(-(x - 5.41) ** 2 / (2 * 0.02 ** 2))
    return {"motor": x, "det": rng.normal(y, np.sqrt(y))}


def reference_peak(data, background=0.0):
    """Independent float64 two-pass reference (math.fsum: correctly rounded sums)."""
    x = np.asarray(data["motor"], dtype=np.float64)
    y = np.asarray(data["det"], dtype=np.float64) - background
    w = np.clip(y, 0, None)
    sw = math.fsum(w)
    c = math.fsum(w * x) / sw
    var = math.fsum(w * (x - c) ** 2) / sw
    return {"centroid": c, "sigma": math.sqrt(var), "integral": np.trapezoid(y, x),
            "peak_position": x[np.argmax(y)], "peak_value": y.max()}


def both(flow, data, batches=(1, 7, 64, 3, 250), max_batch=97, **options):
    spec = flow.spec.with_options(options)
    n = len(next(iter(data.values())))
    post = engine.run_post(spec, MemoryRun(data, visible=n, finished=True), MemorySink())
    run, it = MemoryRun(data), iter(batches)
    live = engine.run_live(spec, run, MemorySink(),
                           engine.LiveSettings(poll_interval=0, max_poll_interval=0, max_batch=max_batch),
                           sleep=lambda _: run.publish(next(it, n)))
    return post, live


@pytest.mark.parametrize("scan", [energy_scan, motor_scan])
@pytest.mark.parametrize("background", [0.0, 1e5])
def test_peak_stats_matches_float64_reference_live_and_post(scan, background):
    data = scan()
    want = reference_peak(data, background)
    for variant, got in zip(("post", "live"), both(peak_stats, data, background=background)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=RTOL), (variant, key)
        assert got["fwhm"] == pytest.approx(2 * math.sqrt(2 * math.log(2)) * want["sigma"], rel=RTOL)
        assert got["frames"] == len(data["det"]) and got["skipped"] == 0


def test_the_data_would_catch_a_one_pass_variance():
    """E[x²] − E[x]² on the energy scan is off far beyond the tolerance: the test data is
    hard enough to catch the cancellation the analyses avoid."""
    data = energy_scan()
    x, w = data["motor"], np.clip(data["det"], 0, None)
    naive = math.sqrt(max((w * x * x).sum() / w.sum() - ((w * x).sum() / w.sum()) ** 2, 0))
    assert abs(naive / reference_peak(data)["sigma"] - 1) > 10 * RTOL


def test_saxs_average_of_float32_frames_on_a_large_baseline():
    """1e5–1e6 counts in float32 frames: a float32 running sum over 3000 frames is off by
    ~1e-4; both variants work in float64 and match the reference to 1e-12."""
    rng = np.random.default_rng(3)
    frames = (4e5 + 6e5 * rng.random((3000, 12, 10))).astype(np.float32)
    want = frames.astype(np.float64).mean(axis=0)
    float32_sum = np.add.reduce(frames, axis=0, dtype=np.float32) / np.float32(len(frames))
    assert np.max(np.abs(float32_sum / want - 1)) > 1e-6, "float32 accumulation is visibly wrong here"
    for variant, got in zip(("post", "live"), both(saxs_average, {"saxs": frames}, batches=(5, 1, 700, 33))):
        np.testing.assert_allclose(got["average"], want, rtol=1e-12, err_msg=variant)


def test_check_passes_the_shipped_analyses_on_realistic_data():
    assert_check(peak_stats, energy_scan(), rtol=RTOL, options={"background": 1e5})
    assert_check(peak_stats, motor_scan(), rtol=RTOL)
    rng = np.random.default_rng(4)
    assert_check(saxs_average, {"saxs": (2e5 + 8e5 * rng.random((400, 8, 8))).astype(np.float32)}, rtol=1e-12)


# ---------------------------------------------------------------- edge scans


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        return type(exc).__name__, str(exc)


def post_outcome(flow, data, exit_status="success"):
    n = len(next(iter(data.values())))
    return outcome(lambda: engine.run_post(flow.spec, MemoryRun(data, visible=n, finished=True,
                                                                 exit_status=exit_status), MemorySink()))


def live_outcome(flow, data, exit_status="success"):
    run = MemoryRun(data, exit_status=exit_status)
    run.publish(0)
    return outcome(lambda: engine.run_live(flow.spec, run, MemorySink(),
                                           engine.LiveSettings(poll_interval=0, max_batch=5),
                                           sleep=lambda _: run.publish(3)))


EMPTY = {"saxs_average": {"saxs": np.zeros((0, 4, 4))},
         "peak_stats": {"det": np.zeros(0), "motor": np.zeros(0)}}


@pytest.mark.parametrize("flow", [saxs_average, peak_stats], ids=lambda f: f.spec.name)
def test_an_empty_scan_fails_the_same_way_in_both_variants(flow):
    post, live = post_outcome(flow, EMPTY[flow.spec.name]), live_outcome(flow, EMPTY[flow.spec.name])
    assert post[0] == live[0] == "EmptyRun"
    assert "no frames" in post[1] and post[1] == live[1]


@pytest.mark.parametrize("frames", [0, 7])
@pytest.mark.parametrize("flow", [saxs_average, peak_stats], ids=lambda f: f.spec.name)
def test_an_aborted_scan_fails_the_same_way_in_both_variants(flow, frames):
    data = energy_scan(frames) if flow is peak_stats else {"saxs": np.ones((frames, 4, 4))}
    post, live = post_outcome(flow, data, "abort"), live_outcome(flow, data, "abort")
    assert post[0] == live[0] == "RunAborted", (post, live)
    assert "exit_status='abort'" in post[1] or "abort" in post[1]
    assert "abort" in live[1]


def test_nan_points_are_skipped_alike_by_peak_stats():
    data = energy_scan(301)
    data["det"][[0, 40, 41, 150]] = np.nan
    data["motor"][200] = np.nan
    post, live = both(peak_stats, data, batches=(40, 1, 1, 100))
    clean = {k: np.delete(v, [0, 40, 41, 150, 200]) for k, v in data.items()}
    want = reference_peak(clean)
    for got in (post, live):
        assert got["skipped"] == 5 and got["frames"] == 301
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=RTOL), key


def test_nan_pixels_propagate_alike_in_saxs_average():
    frames = np.full((20, 3, 3), 5e5)
    frames[4, 1, 1] = np.nan
    frames[11] = np.nan  # a dropped frame
    post, live = both(saxs_average, {"saxs": frames}, batches=(3, 9, 8))
    assert np.isnan(post["average"]).all() and np.isnan(live["average"]).all()
    frames[11] = 5e5
    post, live = both(saxs_average, {"saxs": frames}, batches=(3, 9, 8))
    for got in (post, live):
        assert np.isnan(got["average"][1, 1]) and np.count_nonzero(np.isnan(got["average"])) == 1
        assert np.allclose(np.delete(got["average"].ravel(), 4), 5e5)


def test_all_nan_scan_gives_nan_statistics_in_both_variants():
    data = {"det": np.full(10, np.nan), "motor": np.linspace(5, 6, 10)}
    post, live = both(peak_stats, data, batches=(4, 6))
    for got in (post, live):
        assert got["skipped"] == 10 and np.isnan(got["centroid"]) and np.isnan(got["peak_value"])
