"""No docstring cites a file that is not in the repository (a moved or renamed file leaves
its readers hunting).  Templates (``flows/NAME.py``) and files written at run time are not
citations of repository files.

The same for the architecture: code and docs cite ``docs/architecture.md`` by section
(``§N``, ``step K``, a quoted title) or by a markdown link to a heading's anchor, and every
such citation, in any text file of the repository, must name a section, step or anchor that
page has.  Nothing may cite the design brief the project was built from: it is not in the
repository, so a maintainer who clones it could not follow the citation."""

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


# ------------------------------------------------------------------ docs/architecture.md

ARCH_DOC = "docs/architecture.md"
#: A citation of the design brief the project was built from, which is not in the repository
#: (written in two pieces so that this file does not match itself).
STALE = re.compile("ARCHI" + r"TECTURE(?:\.md|\s*§)")
#: ``docs/architecture.md §2 steps 3 and 5``, ``architecture.md §1, §4``, ``§6 "Trust boundaries"``.
SECTION_CITATION = re.compile(
    r"architecture\.md\s+§(?P<sections>\d+(?:\s*,\s*§\d+)*)"
    r"(?:,?\s+steps?\s+(?P<first>\d+)(?:\s*(?P<sep>–|-|and)\s*(?P<last>\d+))?)?"
    r"(?:\s+\"(?P<title>[^\"]+)\")?")
#: A markdown link into it (``[architecture §N](<relative path>#<anchor>)``, the path
#: relative to the citing file), or a bare ``docs/architecture.md#<anchor>``.
ANCHOR_CITATION = re.compile(r"(?:\[(?P<text>[^\]]*)\]\()?(?P<path>[\w./-]*architecture\.md)#(?P<anchor>[\w-]+)")
LINK_TEXT = re.compile(r"§(?P<section>\d+)(?:,?\s+steps?\s+(?P<first>\d+)(?:\s*(?P<sep>–|-|and)\s*(?P<last>\d+))?)?")


def github_anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def architecture_sections(text: str) -> dict[int, dict]:
    """``{N: {"title", "anchor", "steps"}}`` for each ``## N. Title`` heading; ``steps`` are
    the numbers of the section's top-level numbered list."""
    sections: dict[int, dict] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"## (\d+)\. (.+)$", line)
        if heading:
            current = sections.setdefault(int(heading[1]), {
                "title": heading[2].strip(), "anchor": github_anchor(f"{heading[1]}. {heading[2]}"), "steps": set()})
            continue
        if line.startswith("#"):
            current = None if line.startswith("## ") else current
            continue
        item = re.match(r"(\d+)\. ", line)
        if current is not None and item:
            current["steps"].add(int(item[1]))
    return sections


def architecture_anchors(text: str) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def _steps(match) -> set[int]:
    if not match["first"]:
        return set()
    first, last = int(match["first"]), int(match["last"] or match["first"])
    return set(range(first, last + 1)) if match["sep"] in ("–", "-") else {first, last}


def citation_problems(text: str, architecture: str, where: Path | None = None) -> list[str]:
    """What is wrong with the architecture citations in ``text`` (a file at ``where``)."""
    sections = architecture_sections(architecture)
    anchors = architecture_anchors(architecture)
    problems = [f"cites a file that is not in the repository: {m[0]!r}" for m in STALE.finditer(text)]
    for m in SECTION_CITATION.finditer(text):
        numbers = [int(n) for n in re.findall(r"\d+", m["sections"])]
        for n in numbers:
            if n not in sections:
                problems.append(f"{m[0]!r}: {ARCH_DOC} has no section {n}")
        if numbers[0] in sections:
            section = sections[numbers[0]]
            missing = _steps(m) - section["steps"]
            if missing:
                problems.append(f"{m[0]!r}: section {numbers[0]} has no step {sorted(missing)}")
            if m["title"] and m["title"] != section["title"]:
                problems.append(f"{m[0]!r}: section {numbers[0]} is {section['title']!r}")
    for m in ANCHOR_CITATION.finditer(text):
        relative_to = where.parent if m["text"] is not None and where is not None else REPO
        if (relative_to / m["path"]).resolve() != (REPO / ARCH_DOC).resolve():
            problems.append(f"{m[0]!r}: links to {m['path']}, not to {ARCH_DOC}")
            continue
        if m["anchor"] not in anchors:
            problems.append(f"{m[0]!r}: {ARCH_DOC} has no heading with anchor #{m['anchor']}")
            continue
        said = LINK_TEXT.search(m["text"] or "")
        if said:
            section = sections.get(int(said["section"]))
            if section is None or section["anchor"] != m["anchor"]:
                problems.append(f"{m[0]!r}: the text says §{said['section']}, the link goes to #{m['anchor']}")
            elif _steps(said) - section["steps"]:
                problems.append(f"{m[0]!r}: section {said['section']} has no step {sorted(_steps(said) - section['steps'])}")
    return problems


def _text_of(path: Path) -> str | None:
    data = path.read_bytes()
    return None if b"\0" in data else data.decode("utf-8", errors="replace")


def test_the_architecture_is_in_the_repository_and_every_citation_of_it_resolves():
    architecture = (REPO / ARCH_DOC).read_text()
    assert len(architecture_sections(architecture)) >= 9
    found, problems = 0, []
    for f in repository_files():
        text = _text_of(REPO / f)
        if text is None:
            continue
        found += len(SECTION_CITATION.findall(text)) + len(ANCHOR_CITATION.findall(text))
        problems += [f"{f}: {p}" for p in citation_problems(text, architecture, REPO / f)]
    assert not problems, "\n".join(problems)
    assert found >= 16, f"only {found} citations of {ARCH_DOC} found: is the pattern still right?"


def test_the_check_finds_bad_architecture_citations():
    architecture = (REPO / ARCH_DOC).read_text()
    doc = REPO / "docs" / "example.md"
    md, sec = "architecture" + ".md", " §"
    good = (f"docs/{md}{sec}2 step 5, docs/{md}{sec}1, §4, docs/{md}{sec}6 \"Trust boundaries\", "
            f"[architecture §2, steps 1–4]({md}#2-one-run-step-by-step), docs/{md}#3-scopes")
    assert citation_problems(good, architecture, doc) == []
    bad = {
        "ARCHI" + "TECTURE" + sec + "2 step 4": "not in the repository",
        "../shared/ARCHI" + "TECTURE.md": "not in the repository",
        f"docs/{md}{sec}42": "no section 42",
        f"docs/{md}{sec}1, §42": "no section 42",
        f"docs/{md}{sec}2 step 99": "no step [99]",
        f"docs/{md}{sec}2 steps 1–12": "no step",
        f"docs/{md}{sec}6 \"Scopes\"": "section 6 is",
        f"[architecture §3]({md}#no-such-heading)": "no heading with anchor",
        f"[architecture §3]({md}#6-trust-boundaries)": "the text says §3",
        f"[architecture §2, step 9]({md}#2-one-run-step-by-step)": "no step [9]",
        f"[elsewhere](other/{md}#3-scopes)": "not to docs/architecture.md",
        f"see {md}#3-scopes": "not to docs/architecture.md",
    }
    for text, expected in bad.items():
        problems = citation_problems(text, architecture, doc)
        assert len(problems) == 1 and expected in problems[0], (text, problems)


def test_anchors_are_githubs():
    assert github_anchor("9. Keycloak + OPA + token service: topology and threat model") == \
        "9-keycloak--opa--token-service-topology-and-threat-model"
    assert github_anchor("2. One run, step by step") == "2-one-run-step-by-step"
