"""A throwaway PostgreSQL for the benchmark's Prefect server, when one can be started.

Why by default: Prefect 3.8.8 on SQLite loses flow runs in P7's burst (90 of 100 completed,
``benchmarks/RESULTS-sqlite.md``) and the whole run takes ~23 min instead of ~8; production
runs Prefect on PostgreSQL (docs/production.md).  Uses deployments/postgres/start-local.sh
(Debian's postgresql server); without it the benchmark falls back to SQLite and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from visitflow.stack.services import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "deployments" / "postgres"


@contextlib.contextmanager
def throwaway_prefect_database(log=print):
    """Yield a ``postgresql+asyncpg://`` URL for a fresh database, or None if no server."""
    directory = Path(f"/tmp/vf-bench-pg-{os.getpid()}")  # the postgres OS user must reach it
    try:
        url = subprocess.run(["bash", str(SCRIPTS / "start-local.sh"), str(directory), str(free_port())],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log(f"no throwaway PostgreSQL ({detail.strip().splitlines()[-1] if detail.strip() else exc}); "
            "Prefect runs on SQLite")
        yield None
        return
    try:
        subprocess.run(["psql", "-q", url, "-c", "CREATE DATABASE prefect_bench"], check=True,
                       capture_output=True, text=True, timeout=60)
        yield "postgresql+asyncpg://" + url.split("://", 1)[1].rsplit("/", 1)[0] + "/prefect_bench"
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop-local.sh"), str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
