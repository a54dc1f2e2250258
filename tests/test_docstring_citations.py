"""No docstring cites a file that is not in the repository (a moved or renamed file leaves
its readers hunting).  Templates (``flows/NAME.py``) and files written at run time are not
citations of repository files."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.analysts

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|yaml|yml|json|sh|txt|toml|png|cfg|ini))\b")
#: Files a docstring names that are written at run time, not kept in git — and who writes them.
GENERATED = {
    ".visitflow/prefect-k8s.yaml": "deployments/kubernetes/use-k8s-pool.sh",
    "stack.json": "visitflow up (the stack's state file)",
    "topology.json": "visitflow/production/ha_topology.py (the HA topology's record)",
}


def repository_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (REPO / f).exists()]


def citations(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for cited in CITATION.findall(ast.get_docstring(node) or ""):
                yield getattr(node, "name", "<module>"), cited


def is_template(cited: str) -> bool:
    return any(re.fullmatch(r"[A-Z][A-Z0-9_]+", part.split(".")[0]) or part.startswith("test_NAME")
               for part in cited.split("/"))


def test_every_file_a_docstring_cites_exists():
    files = repository_files()
    names = {Path(f).name for f in files}
    missing = []
    for f in files:
        if not f.endswith(".py"):
            continue
        for where, cited in citations(REPO / f):
            if is_template(cited) or cited in GENERATED:
                continue
            if not ((REPO / cited).exists() if "/" in cited else cited in names):
                missing.append(f"{f}:{where} cites {cited}")
    assert not missing, "\n".join(missing)


def test_the_check_finds_a_dangling_citation(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text('"""See tests/test_gone_long_ago.py and flows/NAME.py."""\n')
    found = [c for _, c in citations(stale)]
    assert found == ["tests/test_gone_long_ago.py", "flows/NAME.py"]
    assert not (REPO / found[0]).exists() and is_template(found[1]) and not is_template(found[0])
