"""Peak statistics of a scalar detector column against a motor: the 1-D analysis.

Outputs: ``centroid`` (intensity-weighted mean position), ``sigma`` (weighted standard
deviation), ``fwhm`` (2.3548·sigma, the Gaussian-equivalent width), ``integral``
(trapezoidal, over the points in scan order), ``peak_position`` and ``peak_value`` (the
maximum), and ``frames``.  Weights are the detector values with negatives clipped to 0.
"""

import numpy as np

from visitflow import analysis

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _stats(sw, swx, swx2, integral, peak_value, peak_position, frames) -> dict:
    centroid = swx / sw if sw > 0 else np.nan
    var = max(swx2 / sw - centroid ** 2, 0.0) if sw > 0 else np.nan
    sigma = np.sqrt(var)
    return {"centroid": float(centroid), "sigma": float(sigma), "fwhm": float(FWHM_PER_SIGMA * sigma),
            "integral": float(integral), "peak_position": float(peak_position),
            "peak_value": float(peak_value), "frames": int(frames)}


class PeakAccumulator:
    """Live form: running weighted moments, trapezoid sum and maximum (O(1) memory)."""

    def __init__(self):
        self.sw = self.swx = self.swx2 = self.integral = 0.0
        self.peak_value, self.peak_position = -np.inf, np.nan
        self.last = None  # (x, y) of the previous point, for the trapezoid across batches
        self.frames = 0

    def update(self, det: np.ndarray, motor: np.ndarray) -> None:
        y = np.asarray(det, dtype=np.float64)
        x = np.asarray(motor, dtype=np.float64)
        if y.size == 0:
            return
        w = np.clip(y, 0, None)
        self.sw += w.sum()
        self.swx += (w * x).sum()
        self.swx2 += (w * x * x).sum()
        xs, ys = (np.concatenate([[self.last[0]], x]), np.concatenate([[self.last[1]], y])) if self.last else (x, y)
        self.integral += float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
        i = int(np.argmax(y))
        if y[i] > self.peak_value:
            self.peak_value, self.peak_position = float(y[i]), float(x[i])
        self.last = (float(x[-1]), float(y[-1]))
        self.frames += y.size

    def result(self) -> dict:
        return _stats(self.sw, self.swx, self.swx2, self.integral, self.peak_value, self.peak_position,
                      self.frames)


@analysis(reads=["det", "motor"], incremental=PeakAccumulator)
def peak_stats(det: np.ndarray, motor: np.ndarray) -> dict:
    """Centroid, width, integral and maximum of a detector column versus a motor."""
    y = np.asarray(det, dtype=np.float64)
    x = np.asarray(motor, dtype=np.float64)
    w = np.clip(y, 0, None)
    sw = w.sum()
    i = int(np.argmax(y))
    return _stats(sw, (w * x).sum(), (w * x * x).sum(), np.trapezoid(y, x), y[i], x[i], y.size)
