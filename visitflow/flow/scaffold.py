"""``visitflow new-analysis NAME --reads a,b [--incremental]``: a new analysis, ready to deploy.

Writes three things into the project (default: the current directory):

- ``flows/NAME.py``: a documented skeleton — the mean of each field over the scan — that
  is already correct, so the analyst edits working code instead of a blank page; with
  ``--incremental`` also its live form (a running mean with Chan's update);
- ``prefect.yaml``: the ``live`` and ``post`` deployments, appended as text so the file's
  comments and anchors stay as they are;
- ``tests/test_NAME.py``: :func:`visitflow.flow.testing.check` on synthetic data, and a direct
  call of the science function.

The skeleton deploys (``visitflow up``, or ``prefect deploy --all``) and its test passes
unchanged; ``visitflow check flows/NAME.py`` checks it without servers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.scopes import valid_name
from ..errors import AnalysisDefinitionError

__all__ = [
    'FLOW', 'INCREMENTAL', 'TEST', 'DEPLOYMENTS', 'render', 'new_analysis',
    'add_new_analysis_arguments', 'run_new_analysis',
]

FLOW = '''"""{title}

Written by ``visitflow new-analysis``: replace the body of ``{name}`` with your science
(and the live form below, if any).  The framework calls it with one array per field in
``reads=``, frames first; return a dict of named outputs (arrays or scalars).  Post runs it
once on the whole scan; live {live_sentence}

Check without servers: ``visitflow check flows/{name}.py``; call it directly:
``{name}.spec({call})`` (docs/analysts.md).
"""

import numpy as np

from visitflow import analysis
{incremental_class}

@analysis(reads={reads!r}{incremental_arg})
def {name}({params}) -> dict:
    """Mean of each field over the scan (float64)."""
    return {{
{outputs}
    }}
'''

INCREMENTAL = '''

class {cls}:
    """Live form of {name}: fed each new batch of frames once; memory stays flat.

    ``update`` must fold a batch into the state so that any split of the scan into batches
    gives the same result as the function on all frames — ``visitflow check`` tries many.
    """

    def __init__(self):
        self.count = 0
        self.means = {{}}

    def update(self, {params}) -> None:
        for field, batch in {{{pairs}}}.items():
            batch = np.asarray(batch, dtype=np.float64)
            if batch.shape[0] == 0:
                continue
            n = self.count + batch.shape[0]
            part = batch.mean(axis=0)
            old = self.means.get(field)
            # Chan et al.: update the mean by the batch's share; no large running sums.
            self.means[field] = part if old is None else old + (part - old) * (batch.shape[0] / n)
        self.count += np.asarray({first}).shape[0]

    def result(self) -> dict:
        return {{f"{{field}}_mean": value for field, value in self.means.items()}}
'''

TEST = '''"""Tests for flows/{name}.py, written by ``visitflow new-analysis`` (they pass as written)."""

from pathlib import Path

import numpy as np

from visitflow.testing import assert_check, load_analyses, synthetic_data

{name} = load_analyses(Path(__file__).resolve().parents[1] / "flows" / "{name}.py")["{name}"]


def test_{name}_post_live_and_resume_agree():
    """Post, live over random batch splits, and a resumed live all match the reference."""
    assert_check({name})


def test_{name}_called_directly():
    data = synthetic_data({name}, frames=20)
    out = {name}.spec(**data)
{asserts}
'''

DEPLOYMENTS = '''  - name: live
    entrypoint: flows/{name}.py:{name}
    description: {live_description}
    <<: *live
  - name: post
    entrypoint: flows/{name}.py:{name}
    description: {post_description}
    <<: *post
'''


def _check(name: str, reads: list[str]) -> None:
    if not (name.isidentifier() and valid_name(name) and name.islower()):
        raise AnalysisDefinitionError(f"analysis name {name!r} must be a lower-case Python identifier, "
                                      "e.g. saxs_average")
    if not reads or any(not (r.isidentifier() and valid_name(r)) for r in reads) or len(set(reads)) != len(reads):
        raise AnalysisDefinitionError(f"--reads {','.join(reads)!r}: give distinct field names, e.g. --reads det,motor")
    if name in reads:
        raise AnalysisDefinitionError("the analysis may not have the name of a field it reads")


def render(name: str, reads: list[str], incremental: bool) -> tuple[str, str, str]:
    """(flows/NAME.py, tests/test_NAME.py, the prefect.yaml deployments) for an analysis."""
    _check(name, reads)
    title = name.replace("_", " ").capitalize() + f": the mean of {', '.join(reads)} over the scan."
    params = ", ".join(f"{r}: np.ndarray" for r in reads)
    cls = "".join(part.capitalize() for part in name.split("_")) + "Live"
    flow = FLOW.format(
        title=title, name=name, reads=list(reads), params=params,
        call=", ".join(f"{r}=..." for r in reads),
        live_sentence=("feeds only new frames to the incremental class." if incremental
                       else "recomputes on the frames so far, throttled."),
        incremental_class=INCREMENTAL.format(cls=cls, name=name, params=params, first=reads[0],
                                             pairs=", ".join(f"{r!r}: {r}" for r in reads)) if incremental else "",
        incremental_arg=f", incremental={cls}" if incremental else "",
        outputs="\n".join(f'        "{r}_mean": np.mean(np.asarray({r}, dtype=np.float64), axis=0),' for r in reads),
    )
    asserts = "\n".join(f'    np.testing.assert_allclose(out["{r}_mean"], np.mean(data["{r}"], axis=0), rtol=1e-12)'
                        for r in reads)
    return flow, TEST.format(name=name, asserts=asserts), DEPLOYMENTS.format(
        name=name, live_description=json.dumps(f"{title} Live while the scan runs."),
        post_description=json.dumps(f"{title} Over the finished scan."))  # JSON strings are YAML


def _with_deployments(prefect_yaml: Path, name: str, text: str) -> str:
    """prefect.yaml's text with ``text`` appended (unchanged if ``name`` is deployed)."""
    import yaml

    current = prefect_yaml.read_text()
    project = yaml.safe_load(current)
    if not isinstance(project, dict) or "deployments" not in project:
        raise RuntimeError(f"{prefect_yaml} has no deployments: list to add to")
    if any(d.get("entrypoint") == f"flows/{name}.py:{name}" for d in project["deployments"] or []):
        return current  # already deployed
    last_key = [line for line in current.splitlines() if line and not line[0].isspace() and not line.startswith("#")]
    if not last_key or not last_key[-1].startswith("deployments:"):
        raise RuntimeError(f"{prefect_yaml}: deployments: must be the last top-level key to append to it")
    if "&live" not in current or "&post" not in current:
        raise RuntimeError(f"{prefect_yaml} has no &live/&post definitions to reuse")
    updated = current.rstrip("\n") + "\n" + text
    parsed = yaml.safe_load(updated)  # never leave a file Prefect cannot read
    assert {(d["entrypoint"], d["name"]) for d in parsed["deployments"]} >= {
        (f"flows/{name}.py:{name}", "live"), (f"flows/{name}.py:{name}", "post")}
    return updated


def new_analysis(root: Path, name: str, reads: list[str], *, incremental: bool = False,
                 force: bool = False) -> list[Path]:
    """Write the analysis, its deployments and its test under ``root``; returns the paths."""
    flow, test, deployments = render(name, reads, incremental)
    root = Path(root)
    flow_path, test_path, prefect_yaml = root / "flows" / f"{name}.py", root / "tests" / f"test_{name}.py", \
        root / "prefect.yaml"
    for path in (flow_path, test_path):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists (use --force to overwrite)")
    if not prefect_yaml.exists():
        raise FileNotFoundError(f"no prefect.yaml in {root}: run this in a visitflow project")
    project_text = _with_deployments(prefect_yaml, name, deployments)  # fails before anything is written
    flow_path.parent.mkdir(parents=True, exist_ok=True)
    test_path.parent.mkdir(parents=True, exist_ok=True)
    flow_path.write_text(flow)
    test_path.write_text(test)
    prefect_yaml.write_text(project_text)
    return [flow_path, prefect_yaml, test_path]


def add_new_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="analysis name, a lower-case Python identifier (e.g. roi_sum)")
    parser.add_argument("--reads", required=True, help="comma-separated raw fields it reads, e.g. det,motor")
    parser.add_argument("--incremental", action="store_true", help="also write a live (incremental) form")
    parser.add_argument("--root", type=Path, default=Path("."), help="project directory (default: .)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing flow and test")


def run_new_analysis(args: argparse.Namespace) -> int:
    try:
        paths = new_analysis(args.root, args.name, [r.strip() for r in args.reads.split(",") if r.strip()],
                             incremental=args.incremental, force=args.force)
    except (AnalysisDefinitionError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"visitflow new-analysis: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    print(f"next: visitflow check flows/{args.name}.py; pytest tests/test_{args.name}.py; visitflow up (deploys)")
    return 0
