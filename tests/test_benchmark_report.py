"""What ``python -m benchmarks`` writes: the hand-written part of RESULTS.md survives a run, and the
load note says which end of the run was busy (pure logic, fast tier)."""

from __future__ import annotations

import io

from benchmarks.__main__ import KEEP_MARKER, merge_kept
from benchmarks.load import LoadWatch


def test_a_run_rewrites_the_table_and_keeps_what_is_below_the_marker():
    first = merge_kept(None, "# visitflow benchmarks\n\n| old table |\n")
    assert first.startswith("# visitflow benchmarks") and first.rstrip().endswith(KEEP_MARKER)
    edited = first + "\n## Where P3's time goes\n\nA profile written by hand.\n"
    second = merge_kept(edited, "# visitflow benchmarks\n\n| new table |\n")
    assert "| new table |" in second and "| old table |" not in second
    assert second.count(KEEP_MARKER) == 1
    assert second.endswith("## Where P3's time goes\n\nA profile written by hand.\n")
    assert merge_kept("an old file without the marker", "generated\n") == "generated\n\n" + KEEP_MARKER + "\n\n"


def _note(start: float, end: float) -> str:
    watch = LoadWatch(stream=io.StringIO())
    watch.start, watch.stop = (start, 0.1, 0.1), (end, 0.1, 0.1)
    return watch.note()


def test_the_load_note_tells_a_shared_start_from_a_busy_end():
    assert _note(0.2, 0.5).endswith("at end 0.50/0.10/0.10.")
    assert "the machine was shared" in _note(3.0, 0.5)
    busy_end = _note(0.15, 2.48)
    assert "quiet at the start" in busy_end and "run's own load" in busy_end
    assert "the machine was shared" not in busy_end


# ---------------------------------------------------------------- P9: through blueapi
def test_a_trial_timeline_is_the_gaps_between_prefects_own_timestamps():
    """The timeline says which step holds the time (the SQLite tail sat in Pending → Submitting):
    each gap is from the previous step; a repeated state counts at its first time."""
    from benchmarks.blueapi_latency import gaps

    states = [("Running", 13.0), ("Scheduled", 10.3), ("Pending", 10.5), ("Submitting", 12.6),
              ("Pending", 10.55), ("Completed", 20.0)]
    assert gaps(10.0, 10.2, states) == {"grant": 0.2, "created": 0.1, "picked_up": 0.2, "submitting": 2.1,
                                        "running": 0.4, "total": 3.0}
    # a missing timestamp (no Secret block found) leaves its two gaps unknown, not wrong
    missing = gaps(10.0, None, [("Scheduled", 10.3), ("Pending", 10.5), ("Submitting", 10.6), ("Running", 11.0)])
    assert missing["grant"] is None and missing["created"] is None and missing["picked_up"] == 0.2
    assert missing["total"] == 1.0


def _trial(total, submitting=0.1):
    return {"grant": 0.1, "created": 0.1, "picked_up": 0.2, "submitting": submitting,
            "running": total - 0.5 - submitting, "total": total}


def test_the_tail_names_the_step_each_slow_trial_lost_its_time_in():
    from benchmarks.blueapi_latency import tail

    trials = [_trial(1.2) for _ in range(8)] + [_trial(3.5, submitting=2.4), _trial(3.6, submitting=2.5)]
    assert tail(trials) == (2, {"submitting": 2})
    assert tail([_trial(1.2) for _ in range(10)]) == (0, {})
    assert tail([]) == (0, {})


def test_p9_row_puts_the_in_process_trigger_beside_blueapi_and_counts_each_tail():
    from benchmarks.blueapi_latency import P9_NAME, p9_cells

    blue, local = [1.0, 1.1, 1.2, 1.0], [0.9, 1.0, 1.0, 1.1]
    slow = {"blueapi": [_trial(1.0), _trial(1.1), _trial(1.0), _trial(3.4, submitting=2.3)],
            "in_process": [_trial(1.0)] * 4}
    name, baseline, ours, ratio = p9_cells(4, blue, local, "postgresql+asyncpg", slow)
    assert name.startswith(P9_NAME) and "n=4 each" in name and "postgresql" in name
    assert baseline.startswith("in-process trigger p50 1.00s") and ours.startswith("blueapi p50 1.05s")
    assert "blueapi 1 > 1 s over p50 (in: submitting ×1)" in ratio
    assert "in-process no trial > 1 s over p50" in ratio


def test_p9_without_blueapis_venv_says_how_to_install_it():
    """Not a silent skip: the row is there, and says the command."""
    from benchmarks.blueapi_latency import p9_missing_row

    name, status, how, _ = p9_missing_row()
    assert name.startswith("P9") and status == "NOT RUN"
    assert "bash .ci/install-blueapi" in how and "--only P9" in how and ".venv-blueapi" in how


def test_a_full_run_has_the_p9_row_and_only_p9_needs_no_local_stack():
    from benchmarks.__main__ import ROWS, STANDALONE

    assert ROWS[-1] == "P9" and len(ROWS) == len(set(ROWS)) == 9
    assert "P9" in STANDALONE and "P1" not in STANDALONE
