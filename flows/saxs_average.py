"""The seed's analysis: the mean SAXS detector image over a scan.

Both forms work in float64 whatever the detector's dtype: a float32 running sum over
thousands of frames of 1e5–1e6 counts loses digits (each addition rounds to ~1e-7 of the
total).  A NaN pixel in any frame makes that pixel NaN in the average, in both forms.
"""

import numpy as np

from visitflow import analysis


class RunningMean:
    """Live form: a running mean updated per batch (Chan et al.'s pairwise update, so the
    state stays at the data's magnitude), each frame read once, memory flat."""

    def __init__(self):
        self.mean = None
        self.count = 0

    def update(self, saxs: np.ndarray) -> None:
        batch = np.asarray(saxs, dtype=np.float64)
        if batch.shape[0] == 0:
            return
        n = self.count + batch.shape[0]
        part = batch.mean(axis=0)
        self.mean = part if self.mean is None else self.mean + (part - self.mean) * (batch.shape[0] / n)
        self.count = n

    def result(self) -> dict[str, np.ndarray]:
        return {"average": self.mean}


@analysis(reads=["saxs"], incremental=RunningMean)
def saxs_average(saxs: np.ndarray) -> dict[str, np.ndarray]:
    """Mean detector image over the scan."""
    return {"average": np.average(np.asarray(saxs, dtype=np.float64), axis=0)}
