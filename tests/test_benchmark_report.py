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
