"""``visitflow check [flows/NAME.py ...]``: :func:`visitflow.flow.testing.check` from the shell.

No servers: each analysis runs post, live over random batch splits and a resumed live on
synthetic data shaped from its ``reads=`` (or a recorded run, ``--data run.npz``), and is
compared with its plain function on all the frames.  Exit status 1 if any disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ['add_arguments', 'run']


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"--shape takes FIELD=AxB (e.g. saxs=64x64), not {text!r}")
    return name, tuple(int(d) for d in dims.lower().split("x") if d)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, help="analysis files (default: flows/*.py)")
    parser.add_argument("--data", help="a recorded run: .npz with one frames-first array per field")
    parser.add_argument("--frames", type=int, default=60, help="synthetic frames (default 60)")
    parser.add_argument("--splits", type=int, default=5, help="random live batch splits (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", action="append", type=_shape, default=[],
                        help="per-frame shape of a field, e.g. saxs=64x64 (default: guessed)")
    parser.add_argument("--options", type=json.loads, default=None,
                        help='option values as a plan sets them, JSON, e.g. \'{"background": 1e5}\'')
    parser.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance (default 1e-9)")


def run(args: argparse.Namespace) -> int:
    from .testing import check, load_analyses, load_recorded

    paths = args.paths or sorted(Path("flows").glob("*.py"))
    if not paths:
        print("visitflow check: no analysis files given and no flows/*.py here", file=sys.stderr)
        return 2
    data = load_recorded(args.data) if args.data else None
    failed = checked = 0
    for path in paths:
        try:
            analyses = load_analyses(path)
        except Exception as exc:  # noqa: BLE001 - a definition error is the answer, not a crash
            print(f"FAIL {path}: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        for name, flow in analyses.items():
            checked += 1
            try:
                report = check(flow, data, frames=args.frames, splits=args.splits, seed=args.seed,
                               options=args.options, rtol=args.rtol, shapes=dict(args.shape))
            except Exception as exc:  # noqa: BLE001
                print(f"FAIL {path}:{name}: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            print(("ok   " if report.ok else "FAIL ") + f"{path}:{name}: {report}")
            failed += not report.ok
    if not checked and not failed:
        print("visitflow check: no @analysis found in " + ", ".join(map(str, paths)), file=sys.stderr)
        return 2
    return 1 if failed else 0
