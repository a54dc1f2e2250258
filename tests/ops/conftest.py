"""The ``ops`` suite's own servers: every one started with JSON logs and its access log, so
one set of processes serves the health, metrics, alert, log and runbook tests.

* ``ops_idp`` — a dev IdP (deployments/idp.yaml as shipped), here the *facility IdP*.
* ``ops_opa`` — a real OPA with deployments/opa/ (its own: the tests stop it).
* ``ops_token_service`` — the token service in production mode (deployments/token-service.yaml
  with this IdP and OPA) trusting ``ops_idp``'s login tokens as subject tokens.
* ``ops_tiled`` — Tiled with visitflow's plug-ins, trusting ``ops_idp``, introspecting tokens.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.fixtures.federation_fixtures import start_token_service
from tests.fixtures.idp_fixtures import SECRETS, start_idp
from tests.fixtures.opa_fixtures import start_opa

JSON_LOGS = ("--log-format", "json", "--log-level", "info")


@pytest.fixture(scope="module")
def ops_idp(tmp_path_factory):
    handle = start_idp(tmp_path_factory.mktemp("ops-idp"), extra_args=(*JSON_LOGS, "--access-log"))
    yield handle
    handle.service.stop()


@pytest.fixture(scope="module")
def ops_opa(tmp_path_factory):
    handle = start_opa(tmp_path_factory.mktemp("ops-opa"))
    yield handle
    handle.proxy.close()
    handle.service.stop()


@pytest.fixture(scope="module")
def ops_token_service(tmp_path_factory, ops_idp, ops_opa, monkeypatch_module):
    # The token service's argv is federation_fixtures'; JSON logs through the environment.
    monkeypatch_module.setenv("VISITFLOW_LOG_FORMAT", "json")
    handle = start_token_service(tmp_path_factory.mktemp("ops-ts"), ops_idp.issuer, ops_opa.url)
    monkeypatch_module.delenv("VISITFLOW_LOG_FORMAT")
    yield handle
    handle.service.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def ops_tiled(tmp_path_factory, ops_idp):
    from tests.fixtures.tiled_fixtures import running_tiled

    with running_tiled(ops_idp, tmp_path_factory.mktemp("ops-tiled"), extra_args=(*JSON_LOGS, "--introspect-client", "tiled"),
                       env={"VISITFLOW_TILED_CLIENT_SECRET": SECRETS["tiled"]}) as handle:
        yield handle


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {series: value}, series written as Prometheus prints them."""
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def save(name: str, url: str) -> str:
    """Keep a scrape's text under $TMPDIR/visitflow-ops-metrics/ (what the closing note quotes)."""
    import os
    from pathlib import Path

    text = httpx.get(url, timeout=10).text
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "visitflow-ops-metrics"
    out.mkdir(exist_ok=True)
    (out / name).write_text(text)
    return text


def total(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    found = 0.0
    for series, value in samples.items():
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            found += value
    return found


__all__ = ["SECRETS", "scrape", "save", "total"]
