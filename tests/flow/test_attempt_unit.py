"""How a live attempt decides it was superseded (visitflow/flow/attempt.py) — pure logic:
Prefect's answer is stubbed, the clock is a counter."""

from __future__ import annotations

import pytest

from visitflow.core.fence import Fence
from visitflow.flow import attempt

FENCE = Fence("0f6c1f7e-0000-4000-8000-000000000001", 1)


class Clock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _answers(monkeypatch, answers):
    """Prefect's run_count answers in order; an exception instance is raised (unreachable)."""
    calls = iter(answers)

    def run_count(flow_run_id):
        assert flow_run_id == FENCE.flow_run_id
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(attempt, "_run_count", run_count)


@pytest.mark.parametrize("run_count, expected", [(2, True), (1, False)])
def test_superseded_when_prefect_counts_a_later_attempt(monkeypatch, run_count, expected):
    _answers(monkeypatch, [run_count])
    clock = Clock()
    assert attempt.superseded(FENCE, sleep=clock.sleep, clock=clock) is expected


def test_while_prefect_is_unreachable_it_keeps_asking(monkeypatch):
    """The cut that stopped this attempt also hides Prefect: no answer is not "not superseded"."""
    _answers(monkeypatch, [OSError("no route to host")] * 3 + [2])
    clock = Clock()
    assert attempt.superseded(FENCE, patience=60, interval=5, sleep=clock.sleep, clock=clock) is True
    assert clock.now == 15


def test_after_its_patience_it_reports_the_error(monkeypatch):
    _answers(monkeypatch, [OSError("no route to host")] * 100)
    clock = Clock()
    assert attempt.superseded(FENCE, patience=20, interval=5, sleep=clock.sleep, clock=clock) is False
    assert clock.now == 20


def test_stop_superseded_leaves_through_prefects_abort_after_logging():
    from prefect.exceptions import Abort

    lines = []

    class Logger:
        def error(self, message):
            lines.append(message)

    with pytest.raises(Abort, match="attempt 1\\) stops"):
        attempt.stop_superseded(Logger(), FENCE, "live fence: superseded")
    assert lines and "no state is reported" in lines[0]
