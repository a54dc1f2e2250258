"""One reading of ``CI`` (tests/fixtures/ci.py), and ``.ci/run`` setting it itself.

Why: a suite that skips when its server is missing is only trustworthy if CI cannot skip it.
That needs every fixture to read ``CI`` the same way (it was read five ways, so ``CI=1`` let
some suites skip), and ``.ci/run`` to set it, so that running it by hand is the CI run.
(Pure inspection and pure logic: no servers.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.fixtures import ci

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1", "yes", "on", "github-actions", " true "])
def test_any_other_non_empty_value_means_ci(value):
    assert ci.in_ci({"CI": value}) is True


@pytest.mark.parametrize("value", ["", "0", "false", "FALSE", "False", "no", "NO", "  "])
def test_empty_zero_false_and_no_mean_a_developer_machine(value):
    assert ci.in_ci({"CI": value}) is False


def test_unset_means_a_developer_machine():
    assert ci.in_ci({}) is False


def test_a_missing_part_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="redis-server is not installed"):
        ci.missing_part("redis-server is not installed")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        ci.missing_part("redis-server is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        ci.missing_part("redis-server is not installed")


def _names_the_ci_variable(path: Path) -> bool:
    """A string literal ``"CI"`` anywhere in the module: ``os.environ.get("CI")``,
    ``os.getenv("CI")``, ``environ["CI"]``, ``{"CI": ...}`` alike."""
    tree = ast.parse(path.read_text(errors="replace"))
    return any(isinstance(node, ast.Constant) and node.value == "CI" for node in ast.walk(tree))


def test_only_the_helper_reads_ci():
    readers = []
    for folder in ("tests", "benchmarks", "visitflow", "flows", "blocks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if _names_the_ci_variable(path) and path != Path(__file__).resolve():
                readers.append(str(path.relative_to(ROOT)))
    assert readers == ["tests/fixtures/ci.py"], "read CI through tests.fixtures.ci.in_ci() / missing_part()"


def test_ci_run_exports_ci_true_before_installing_or_testing():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    export = lines.index("export CI=true")
    first_command = next(i for i, line in enumerate(lines) if line.startswith(("bash ", "python ")))
    pytest_run = next(i for i, line in enumerate(lines) if line.startswith("python -m pytest"))
    assert export < first_command < pytest_run
