"""The pure parts of ``python -m benchmarks.facility``: its arguments, sizes, the ideal
makespan, the TLS statement per hop, and the table it writes from measured samples.
(No server; the measuring itself is the benchmark's run, benchmarks/results/facility.md.)"""

from __future__ import annotations

import pytest

from benchmarks import facility, measures
from benchmarks.facility_topology import HOPS, hops


def test_defaults_measure_every_row_on_the_production_idp_beside_the_local_stack():
    args = facility.parse_args([])
    assert args.only == {"P1", "P2", "P7"} and args.idp == "production" and args.local and not args.quick
    assert args.out.endswith("benchmarks/results/facility.md")


def test_rows_idp_and_local_can_be_chosen_and_unknown_rows_are_refused(capsys):
    args = facility.parse_args(["--only", "p1, p7", "--idp", "dev", "--no-local", "--quick"])
    assert args.only == {"P1", "P7"} and args.idp == "dev" and not args.local and args.quick
    assert args.argv == ["--only", "p1, p7", "--idp", "dev", "--no-local", "--quick"], "the results name the command"
    with pytest.raises(SystemExit):
        facility.parse_args(["--only", "P1,P3"])
    assert "unknown rows ['P3']" in capsys.readouterr().err


def test_quick_is_smaller_and_p7_keeps_the_local_benchmarks_shape():
    full, quick = facility.sizes(False), facility.sizes(True)
    assert (full.p7_triggers, full.p7_seconds, full.p7_concurrency, full.p2_frames) == (100, 2.0, 20, 100)
    assert all(getattr(quick, f) <= getattr(full, f) for f in ("p1_starts", "p1_triggers", "p2_frames", "p7_triggers"))


def test_ideal_makespan_is_whole_waves_of_the_concurrency_limit():
    assert facility.ideal_makespan(100, 2.0, 20) == 10.0
    assert facility.ideal_makespan(30, 2.0, 20) == 4.0     # a second, partial wave still takes 2 s


def test_only_the_keycloak_hops_are_tls_and_only_with_the_production_idp():
    prod, dev = hops("production"), hops("dev")
    assert [h for h, _, t in prod if t == "TLS"] == ["user login", "subject-token check", "user-token check"]
    assert all(t != "TLS" for _, _, t in dev)
    assert len(prod) == len(dev) == len(HOPS)
    assert dict((h, t) for h, _, t in prod)["databases"].startswith("plain TCP")
    with pytest.raises(ValueError):
        hops("staging")


def test_lags_leave_out_frames_written_before_the_first_result():
    written = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0}
    got = {0: 11.5, 1: 11.5, 2: 12.25, 3: 13.5}      # the flow started after frame 1 was written
    every, steady = measures.lags(written, got)
    assert every == [1.5, 0.5, 0.25, 0.5] and steady == [0.25, 0.5]
    assert measures.lags(written, {}) == ([], [])


def _results():
    p1 = {"startdoc_to_created_s": [0.1] * 5, "create_to_running_s": [0.4] * 5}
    p2 = {"flow_all_s": [1.0, 0.5], "flow_steady_s": [0.5], "frames": 100, "frames_seen": 100, "final": "COMPLETED"}
    p7 = {"runs": 100, "completed": 100, "duplicates": 0, "starts_s": [1.0, 3.0], "makespan_s": 20.0,
          "total_s": 21.0, "retries": 0}
    slower = {"startdoc_to_created_s": [0.3] * 5, "create_to_running_s": [0.4] * 5}
    return {"local": {"P1": p1, "P2": p2, "P7": p7},
            "facility": {"P1": slower, "P2": None, "P7": {**p7, "makespan_s": 30.0}}}


def test_the_table_puts_both_topologies_side_by_side_with_the_facility_over_local_ratio():
    lines = facility.table(_results(), facility.sizes(False))
    p1, p2, p7 = lines[2:]
    assert "0.50s / p95 0.50s" in p1 and "0.70s / p95 0.70s" in p1 and "1.40×" in p1
    assert "p50 0.50s" in p2 and p2.rstrip(" |").endswith("—"), "a failed facility P2 shows as a dash"
    assert "makespan 20.0s = 2.0× ideal (10s)" in p7 and "makespan 30.0s = 3.0× ideal" in p7 and "1.50× makespan" in p7


def test_the_table_keeps_only_the_rows_asked_for():
    lines = facility.table(_results(), facility.sizes(False), only={"P7"})
    assert len(lines) == 3 and lines[2].startswith("| P7 burst")


def test_the_side_measured_first_alternates_row_by_row():
    sides = ["facility", "local"]
    assert [facility.order(sides, row)[0] for row in ("P1", "P2", "P7")] == ["facility", "local", "facility"]
    assert facility.order(["facility"], "P2") == ["facility"]
