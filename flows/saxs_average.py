"""The seed's analysis: the mean SAXS detector image over a scan."""

import numpy as np

from visitflow import analysis


class RunningMean:
    """Live form: a running sum of frames, so each frame is read once and memory stays flat."""

    def __init__(self):
        self.total = None
        self.count = 0

    def update(self, saxs: np.ndarray) -> None:
        batch = np.asarray(saxs, dtype=np.float64)
        if batch.shape[0] == 0:
            return
        part = batch.sum(axis=0)
        self.total = part if self.total is None else self.total + part
        self.count += batch.shape[0]

    def result(self) -> dict[str, np.ndarray]:
        return {"average": self.total / self.count}


@analysis(reads=["saxs"], incremental=RunningMean)
def saxs_average(saxs: np.ndarray) -> dict[str, np.ndarray]:
    """Mean detector image over the scan."""
    return {"average": np.average(saxs, axis=0)}
