"""A throwaway PostgreSQL for the benchmark's Prefect server, when one can be started.

Why by default: Prefect 3.8.8 on SQLite loses flow runs in P7's burst (90 of 100 completed,
``benchmarks/RESULTS-sqlite.md``) and the whole run takes ~23 min instead of ~8; production
runs Prefect on PostgreSQL (docs/production.md).  Uses deployments/postgres/start-local.sh
(Debian's postgresql server); without it the benchmark falls back to SQLite and says so.
``python -m benchmarks.facility`` puts every database of its topology (Keycloak's, the token
service's state, Tiled's catalog, Prefect's) on one such cluster: :func:`throwaway_cluster`,
there with TLS (``tls=``: start-local.sh's PG_TLS_CERT/PG_TLS_KEY, TCP logins TLS only).

TLS URLs: the cluster's URL is libpq's form (``?sslmode=verify-full&sslrootcert=CA``: psql,
asyncpg's own DSN parser, Tiled's tabular storage through ADBC).  SQLAlchemy's asyncpg dialect
passes a URL's query on as ``asyncpg.connect`` keyword arguments, which know ``ssl`` but not
``sslrootcert``: :func:`create_database` writes ``?ssl=verify-full`` there, and asyncpg then
takes the CA from ``PGSSLROOTCERT`` (the facility topology sets it for its processes).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from visitflow.stack.services import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "deployments" / "postgres"
_CLUSTERS = itertools.count()


@contextlib.contextmanager
def throwaway_cluster(log=print, *, tls: tuple[Path, Path, Path] | None = None):
    """Yield the ``postgresql://`` URL of a fresh cluster (its superuser, database ``postgres``),
    or None if no server can be started; the cluster is stopped and deleted afterwards.

    ``tls`` (server certificate, its key, the CA file): the server has that pair and refuses
    TCP logins without TLS; the URL then says ``sslmode=verify-full&sslrootcert=<the CA>``."""
    # the postgres OS user must reach it; one directory per cluster (a run may hold two at once:
    # start-local.sh on a running cluster's directory would hand back that cluster)
    directory = Path(f"/tmp/vf-bench-pg-{os.getpid()}-{next(_CLUSTERS)}")
    env = {**os.environ, "PG_TLS_CERT": str(tls[0]), "PG_TLS_KEY": str(tls[1])} if tls else None
    try:
        url = subprocess.run(["bash", str(SCRIPTS / "start-local.sh"), str(directory), str(free_port())],
                             capture_output=True, text=True, timeout=120, check=True, env=env).stdout.strip()
        if tls:
            url += f"?sslmode=verify-full&sslrootcert={quote(str(tls[2]), safe='/')}"
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


def database_url(cluster_url: str, name: str, driver: str = "postgresql") -> str:
    """The URL of database ``name`` on the cluster of ``cluster_url`` (libpq's form) for
    ``driver``: ``postgresql`` keeps libpq's query; ``postgresql+asyncpg`` (SQLAlchemy) turns
    ``sslmode`` into asyncpg's ``ssl`` keyword and leaves the CA to ``PGSSLROOTCERT``."""
    parts = urlsplit(cluster_url)
    query = parse_qsl(parts.query)
    if driver.endswith("+asyncpg"):
        query = [("ssl", v) for k, v in query if k == "sslmode"]
    return urlunsplit((driver, parts.netloc, f"/{name}", urlencode(query, safe="/"), ""))


def create_database(cluster_url: str, name: str, driver: str = "postgresql") -> str:
    """``CREATE DATABASE name`` on the cluster; its URL with ``driver`` (``postgresql+asyncpg``
    for SQLAlchemy's async engine, as Prefect and Tiled's catalog want): :func:`database_url`."""
    subprocess.run(["psql", "-q", cluster_url, "-c", f"CREATE DATABASE {name}"], check=True,
                   capture_output=True, text=True, timeout=60)
    return database_url(cluster_url, name, driver)


def sibling_database(url: str, name: str, driver: str = "postgresql+asyncpg") -> str:
    """A new database ``name`` on the cluster that ``url`` (any driver, any database) is on:
    P9's own Prefect beside the run's (one Prefect server per database)."""
    parts = urlsplit(url)
    query = [("sslmode" if k == "ssl" else k, v) for k, v in parse_qsl(parts.query)]
    cluster = urlunsplit(("postgresql", parts.netloc, "/postgres", urlencode(query, safe="/"), ""))
    return create_database(cluster, name, driver)


@contextlib.contextmanager
def throwaway_prefect_database(log=print):
    """Yield a ``postgresql+asyncpg://`` URL for a fresh database, or None if no server."""
    with throwaway_cluster(log) as url:
        if url is None:
            log("Prefect runs on SQLite")
        yield create_database(url, "prefect_bench", "postgresql+asyncpg") if url else None
