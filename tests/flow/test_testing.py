"""visitflow.flow.testing and `visitflow check`: the server-free check catches a wrong incremental
form and passes a right one, from Python and from the shell."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from visitflow.flow.builder import analysis
from visitflow.flow.testing import MemoryRun, MemorySink, assert_check, check, load_analyses, synthetic_data

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.analysts

RIGHT = '''
import numpy as np
from visitflow import analysis


class Mean:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, det):
        self.total = self.total + np.asarray(det, dtype=np.float64).sum(axis=0)
        self.count += len(det)

    def result(self):
        return {"mean": self.total / self.count}


@analysis(reads=["det"], incremental=Mean)
def det_mean(det):
    """Mean of det."""
    return {"mean": np.mean(np.asarray(det, dtype=np.float64), axis=0)}
'''

# The classic mistake: the mean of batch means, unweighted — right only when every batch
# has the same size, so a check with one batch size would pass it.
WRONG = RIGHT.replace('''        self.total = self.total + np.asarray(det, dtype=np.float64).sum(axis=0)
        self.count += len(det)''', '''        self.total = self.total + np.asarray(det, dtype=np.float64).mean(axis=0)
        self.count += 1''')


def write(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "visitflow.cli", "check", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_check_passes_the_right_incremental_and_fails_the_wrong_one(tmp_path):
    right = load_analyses(write(tmp_path, "right", RIGHT))["det_mean"]
    wrong = load_analyses(write(tmp_path, "wrong", WRONG))["det_mean"]
    report = assert_check(right)
    assert report.ok and "post" in report.runs and "live resumed" in report.runs
    assert sum(r.startswith("live split") for r in report.runs) == 5
    bad = check(wrong)
    assert not bad.ok
    assert any(p.startswith("live split") and "mean: max |difference|" in p for p in bad.problems), bad.problems
    with pytest.raises(AssertionError, match="live split"):
        assert_check(wrong)


def test_check_catches_double_counting_on_resume():
    class Replays:
        """Right on a clean run; a resume replays [0, checkpoint) and this form keeps a count
        outside its state (a class attribute), so the replay counts those frames twice."""
        seen = 0

        def __init__(self):
            self.total = 0.0

        def update(self, det):
            self.total += float(np.sum(det))
            type(self).seen += len(det)

        def result(self):
            return {"sum": self.total, "frames": type(self).seen}

    @analysis(reads=["det"], incremental=Replays, name="replays")
    def replays(det):
        return {"sum": float(np.sum(det)), "frames": len(det)}

    report = check(replays, splits=0)
    assert not report.ok and "frames" in str(report)


def test_cli_exit_status_follows_the_check(tmp_path):
    ok = cli(write(tmp_path, "right", RIGHT))
    assert ok.returncode == 0 and "ok   " in ok.stdout and ": OK" in ok.stdout, ok.stdout + ok.stderr
    bad = cli(write(tmp_path, "wrong", WRONG))
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "live split" in bad.stdout, bad.stdout + bad.stderr


def test_cli_checks_the_shipped_analyses_and_a_recorded_run(tmp_path):
    shipped = cli()
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert "peak_stats" in shipped.stdout and "saxs_average" in shipped.stdout
    data = synthetic_data(load_analyses(REPO / "flows/saxs_average.py")["saxs_average"], 40,
                          shapes={"saxs": (16, 12)})
    assert data["saxs"].shape == (40, 16, 12)
    np.savez(tmp_path / "run.npz", **data)
    recorded = cli(REPO / "flows/saxs_average.py", "--data", tmp_path / "run.npz")
    assert recorded.returncode == 0 and "on 40 frames" in recorded.stdout, recorded.stdout + recorded.stderr
    options = cli(REPO / "flows/peak_stats.py", "--options", '{"background": 2e5}')
    assert options.returncode == 0, options.stdout + options.stderr
    refused = cli(REPO / "flows/peak_stats.py", "--options", '{"nonsense": 1}')
    assert refused.returncode == 1 and "nonsense" in refused.stdout, refused.stdout


def test_definition_errors_are_a_failed_check(tmp_path):
    broken = write(tmp_path, "broken", RIGHT.replace('reads=["det"]', 'reads=["detector"]'))
    out = cli(broken)
    assert out.returncode == 1 and "AnalysisDefinitionError" in out.stdout, out.stdout


def test_memory_run_and_sink_are_what_the_engine_drives():
    from visitflow.flow import engine

    flow = load_analyses(REPO / "flows/saxs_average.py")["saxs_average"]
    data = {"saxs": np.arange(24.0).reshape(6, 2, 2)}
    run, sink = MemoryRun(data), MemorySink()
    out = engine.run_live(flow.spec, run, sink, engine.LiveSettings(poll_interval=0, max_batch=2),
                          sleep=lambda _: run.publish(2))
    np.testing.assert_array_equal(out["average"], data["saxs"].mean(axis=0))
    assert [w[1:] for w in sink.writes][-1] == (6, "complete") and sink.checkpoint() == 6
