"""A throwaway PostgreSQL for the benchmark's Prefect server, when one can be started.

Why by default: Prefect 3.8.8 on SQLite loses flow runs in P7's burst (90 of 100 completed,
``benchmarks/RESULTS-sqlite.md``) and the whole run takes ~23 min instead of ~8; production
runs Prefect on PostgreSQL (docs/production.md).  Uses deployments/postgres/start-local.sh
(Debian's postgresql server); without it the benchmark falls back to SQLite and says so.
``python -m benchmarks.facility`` puts every database of its topology (Keycloak's, the token
service's state, Tiled's catalog, Prefect's) on one such cluster: :func:`throwaway_cluster`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from pathlib import Path

from visitflow.stack.services import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "deployments" / "postgres"
_CLUSTERS = itertools.count()


@contextlib.contextmanager
def throwaway_cluster(log=print):
    """Yield the ``postgresql://`` URL of a fresh cluster (its superuser, database ``postgres``),
    or None if no server can be started; the cluster is stopped and deleted afterwards."""
    # the postgres OS user must reach it; one directory per cluster (a run may hold two at once:
    # start-local.sh on a running cluster's directory would hand back that cluster)
    directory = Path(f"/tmp/vf-bench-pg-{os.getpid()}-{next(_CLUSTERS)}")
    try:
        url = subprocess.run(["bash", str(SCRIPTS / "start-local.sh"), str(directory), str(free_port())],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log(f"no throwaway PostgreSQL ({detail.strip().splitlines()[-1] if detail.strip() else exc})")
        yield None
        return
    try:
        yield url
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop-local.sh"), str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def create_database(cluster_url: str, name: str, driver: str = "postgresql") -> str:
    """``CREATE DATABASE name`` on the cluster; its URL with ``driver`` (``postgresql+asyncpg``
    for SQLAlchemy's async engine, as Prefect and Tiled's catalog want)."""
    subprocess.run(["psql", "-q", cluster_url, "-c", f"CREATE DATABASE {name}"], check=True,
                   capture_output=True, text=True, timeout=60)
    return f"{driver}://" + cluster_url.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"


def sibling_database(url: str, name: str, driver: str = "postgresql+asyncpg") -> str:
    """A new database ``name`` on the cluster that ``url`` (any driver, any database) is on:
    P9's own Prefect beside the run's (one Prefect server per database)."""
    cluster = "postgresql://" + url.split("://", 1)[1].rsplit("/", 1)[0] + "/postgres"
    return create_database(cluster, name, driver)


@contextlib.contextmanager
def throwaway_prefect_database(log=print):
    """Yield a ``postgresql+asyncpg://`` URL for a fresh database, or None if no server."""
    with throwaway_cluster(log) as url:
        if url is None:
            log("Prefect runs on SQLite")
        yield create_database(url, "prefect_bench", "postgresql+asyncpg") if url else None
