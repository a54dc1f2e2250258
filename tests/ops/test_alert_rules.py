"""deployments/prometheus/rules.yml: checked by ``promtool check rules`` and each alert
evaluated by ``promtool test rules`` on series scraped from the real services after the
test drove the alert's condition (the worker's alerts: tests/ops/test_story.py; the live lag:
tests/ops/test_provision.py).

Series are given to promtool as Prometheus would have stored them: each scrape's value
with the ``job``/``instance`` labels a scrape config adds, one scrape a minute.  Where a
condition needs more wall time than a test may take (an outbox item waiting 10 minutes),
the scraped value is continued at the clock's rate and the test says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fixtures.ci import missing_part
from tests.fixtures.waiting import wait_until
from tests.ops.conftest import scrape, total
from visitflow.stack.services import free_port

pytestmark = pytest.mark.ops

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deployments" / "prometheus" / "rules.yml"
GRANT_SCOPE = "run:saxs_average:a1 read:raw:a1/{run} write:processed:a1/{run}"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_part("promtool is not installed (bash .ci/install-prometheus)")
    return path


def _rule(alert: str) -> dict:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return rule
    raise AssertionError(f"no alert {alert} in {RULES}")


def _annotations(alert: str, labels: dict) -> dict:
    """The rule's annotations as Prometheus renders them (they use only ``$labels``)."""
    return {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
            for k, v in _rule(alert)["annotations"].items()}


def promtool_test(tmp: Path, alert: str, series: dict[str, list[float]], cases: list[tuple[str, list[dict]]]) -> None:
    """Evaluate ``alert`` on ``series`` (one value a minute) at each ``(eval_time, expected label sets)``."""
    tests = [{
        "interval": "1m",
        "input_series": [{"series": s, "values": " ".join(repr(float(v)) for v in values)}
                         for s, values in series.items()],
        "alert_rule_test": [{
            "eval_time": when, "alertname": alert,
            "exp_alerts": [{"exp_labels": {**_rule(alert)["labels"], **labels},
                            "exp_annotations": _annotations(alert, labels)} for labels in expected],
        } for when, expected in cases],
    }]
    path = tmp / f"{alert}.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{path.read_text()}"


def test_rules_pass_promtool_check():
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_opa_unavailable_fires_on_the_token_services_scraped_failures(tmp_path, ops_idp, ops_opa, ops_token_service):
    url = f"{ops_token_service.issuer}/metrics"
    labels = 'kind="opa",ok="false",job="visitflow-token-service",instance="ts-1"'
    before = total(scrape(url), "visitflow_authority_queries_total", kind="opa", ok="false")
    alice = ops_idp.token("alice")
    ops_opa.down()
    try:
        run = uuid.uuid4().hex     # a new question: not answered from the decision cache
        r = ops_token_service.exchange_response(alice, "blueapi", audience="visitflow", scope=GRANT_SCOPE.format(run=run))
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
    finally:
        ops_opa.up()
    after = total(scrape(url), "visitflow_authority_queries_total", kind="opa", ok="false")
    assert after > before
    series = {f"visitflow_authority_queries_total{{{labels}}}": [before, before, after, after, after]}
    promtool_test(tmp_path, "VisitflowOPAUnavailable", series,
                  [("1m", []), ("3m", [{"job": "visitflow-token-service"}])])


def _trigger(tmp_path, issuer: str, token_holder: dict, port: int):
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    return AnalysisTrigger(TriggerSettings(issuer=issuer, prefect_api_url="http://127.0.0.1:9/api",
                                           client_secret="blueapi-dev-secret", state_dir=tmp_path / "trigger",
                                           max_backoff=1.0, metrics_port=port), token=lambda: token_holder["token"])


def test_refusal_spike_fires_on_the_triggers_scraped_refusals(tmp_path, ops_idp):
    port = free_port()
    holder = {"token": ops_idp.token("carol")}    # may not start analyses on a1
    trig = _trigger(tmp_path, ops_idp.issuer, holder, port)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        before = total(scrape(url), "visitflow_trigger_refusals_total", reason="invalid_scope")
        runs = [f"r{i}" for i in range(6)]
        for run in runs:
            trig.request("saxs_average", "a1", run)
        wait_until(lambda: all(trig.outbox.grant("saxs_average", "a1", r).state == "refused" for r in runs),
                   timeout=90, what="six refusals")
        after = total(scrape(url), "visitflow_trigger_refusals_total", reason="invalid_scope")
    finally:
        trig.close()
    assert after - before == 6
    series = {'visitflow_trigger_refusals_total{reason="invalid_scope",job="visitflow-trigger",instance="bl-1"}':
              [before, before, after, after]}
    promtool_test(tmp_path, "VisitflowRefusalSpike", series,
                  [("1m", []), ("3m", [{"reason": "invalid_scope"}])])


def test_outbox_stuck_fires_on_the_triggers_scraped_outbox_age(tmp_path, ops_idp):
    """Prefect unreachable: the grant waits in the outbox.  The scraped age is continued at
    one second a second (emulated: the test does not wait the alert's 12 minutes)."""
    port = free_port()
    trig = _trigger(tmp_path, ops_idp.issuer, {"token": ops_idp.token("alice")}, port)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        trig.request("saxs_average", "a1", "r-stuck")
        wait_until(lambda: trig.outbox.grant("saxs_average", "a1", "r-stuck").state == "store", timeout=60,
                   what="the grant waiting for Prefect")
        first = total(scrape(url), "visitflow_trigger_outbox_oldest_seconds")
        wait_until(lambda: total(scrape(url), "visitflow_trigger_outbox_oldest_seconds") >= first + 1, timeout=30,
                   what="the outbox age growing while Prefect stays away")
        assert total(scrape(url), "visitflow_trigger_outbox_depth", item="grant:store") == 1
    finally:
        trig.close()
    assert first > 0
    series = {'visitflow_trigger_outbox_oldest_seconds{job="visitflow-trigger",instance="bl-1"}':
              [first + 60 * k for k in range(16)]}
    promtool_test(tmp_path, "VisitflowOutboxStuck", series,
                  [("5m", []), ("15m", [{"instance": "bl-1"}])])
