"""visitflow.core.jsonlog: ids from the context, tokens never printed (pure logic)."""

from __future__ import annotations

import json
import logging

from visitflow.core.jsonlog import JsonFormatter, RedactingFormatter, log_context, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl"


def _record(msg: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("visitflow.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_redact_replaces_jwts_and_authorization_credentials():
    text = f"got {JWT} with Authorization: Bearer {JWT} and Basic dmlzaXRmbG93OnNlY3JldA=="
    out = redact(text)
    assert JWT not in out and "dmlzaXRmbG93OnNlY3JldA==" not in out
    assert out.startswith("got [redacted-token]") and "Basic [redacted]" in out


def test_json_lines_carry_the_context_ids_and_no_token():
    fmt = JsonFormatter()
    with log_context(visit="a1", run="r1", request_id="req-7"):
        with log_context(analysis="saxs_average", flow_run=None):
            doc = json.loads(fmt.format(_record("exchanged %s", JWT, flow_run="fr-1")))
    assert doc["visit"] == "a1" and doc["run"] == "r1" and doc["request_id"] == "req-7"
    assert doc["analysis"] == "saxs_average" and doc["flow_run"] == "fr-1"
    assert doc["msg"] == "exchanged [redacted-token]" and doc["level"] == "INFO"
    outside = json.loads(fmt.format(_record("plain")))
    assert not {"visit", "run", "analysis", "request_id"} & set(outside), "ids do not leak out of their context"
    assert JWT not in RedactingFormatter("%(message)s").format(_record("t=%s", JWT))
