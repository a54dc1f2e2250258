"""Peak statistics of a scalar detector column against a motor: the 1-D analysis.

Outputs, of the signal ``det - background``: ``centroid`` (intensity-weighted mean
position), ``sigma`` (weighted standard deviation), ``fwhm`` (2.3548·sigma, the
Gaussian-equivalent width), ``integral`` (trapezoidal, over the points in scan order),
``peak_position`` and ``peak_value`` (the maximum), ``frames`` (points in the scan) and
``skipped`` (points with a non-finite det or motor value, left out of everything).
Weights are the signal with negatives clipped to 0.

Numerics: motor positions sit far from zero (10–12 keV energies, millimetre offsets) and
count rates carry a large baseline, so the textbook ``E[x²] − E[x]²`` cancels
catastrophically.  Post uses two passes (mean, then squared deviations); live merges
per-batch moments with Chan et al.'s update (West's weighted form), so both agree with a
float64 two-pass reference to ~1e-12 (tests/flow/test_numerics.py).
"""

import numpy as np
from pydantic import Field

from visitflow import analysis
from visitflow.options import Options

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class PeakOptions(Options):
    background: float = Field(0.0, ge=0, description="Counts subtracted from every detector value before the statistics.")


def _clean(det, motor, background: float):
    """(positions, signal, non-finite count): float64, non-finite points dropped."""
    y = np.asarray(det, dtype=np.float64).ravel()
    x = np.asarray(motor, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok] - background, int(ok.size - np.count_nonzero(ok))


def _moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """(sum of weights, weighted mean, sum of weighted squared deviations), two-pass."""
    sw = float(w.sum())
    if sw <= 0:
        return 0.0, 0.0, 0.0
    mean = float((w * x).sum() / sw)
    return sw, mean, float((w * (x - mean) ** 2).sum())


def _stats(sw, mean, m2, integral, peak_value, peak_position, frames, skipped) -> dict:
    sigma = np.sqrt(max(m2 / sw, 0.0)) if sw > 0 else np.nan
    return {"centroid": float(mean) if sw > 0 else np.nan, "sigma": float(sigma),
            "fwhm": float(FWHM_PER_SIGMA * sigma), "integral": float(integral),
            "peak_position": float(peak_position), "peak_value": float(peak_value),
            "frames": int(frames), "skipped": int(skipped)}


class PeakAccumulator:
    """Live form: merged weighted moments, trapezoid sum and maximum (O(1) memory)."""

    def __init__(self, background: float = 0.0):
        self.background = background
        self.sw = self.mean = self.m2 = self.integral = 0.0
        self.peak_value, self.peak_position = np.nan, np.nan
        self.last = None  # (x, y) of the previous finite point, for the trapezoid across batches
        self.frames = self.skipped = 0

    def update(self, det: np.ndarray, motor: np.ndarray) -> None:
        x, y, skipped = _clean(det, motor, self.background)
        self.frames += x.size + skipped
        self.skipped += skipped
        if x.size == 0:
            return
        sw_b, mean_b, m2_b = _moments(x, np.clip(y, 0, None))
        if sw_b > 0:  # Chan/West merge of (sw, mean, m2) with the batch's
            total = self.sw + sw_b
            delta = mean_b - self.mean
            self.mean += delta * (sw_b / total)
            self.m2 += m2_b + delta * delta * (self.sw * sw_b / total)
            self.sw = total
        xs, ys = (np.concatenate([[self.last[0]], x]), np.concatenate([[self.last[1]], y])) if self.last else (x, y)
        self.integral += float(np.trapezoid(ys, xs))
        i = int(np.argmax(y))
        if not y[i] <= self.peak_value:  # strictly greater, or the first finite point
            self.peak_value, self.peak_position = float(y[i]), float(x[i])
        self.last = (float(x[-1]), float(y[-1]))

    def result(self) -> dict:
        return _stats(self.sw, self.mean, self.m2, self.integral, self.peak_value, self.peak_position,
                      self.frames, self.skipped)


@analysis(reads=["det", "motor"], incremental=PeakAccumulator, options=PeakOptions)
def peak_stats(det: np.ndarray, motor: np.ndarray, background: float = 0.0) -> dict:
    """Centroid, width, integral and maximum of a detector column versus a motor."""
    x, y, skipped = _clean(det, motor, background)
    sw, mean, m2 = _moments(x, np.clip(y, 0, None))
    i = int(np.argmax(y)) if y.size else None
    return _stats(sw, mean, m2, np.trapezoid(y, x) if y.size else 0.0,
                  y[i] if i is not None else np.nan, x[i] if i is not None else np.nan, x.size + skipped, skipped)
