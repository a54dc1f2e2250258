"""One JSON object per log line, carrying the ids an operator searches by.

``--log-format json`` (or ``VISITFLOW_LOG_FORMAT=json``) on every visitflow service
(token service, Tiled, the trigger, the worker and its flow runs) switches the root
handler to :class:`JsonFormatter`: ``ts``, ``level``, ``logger``, ``msg`` and — whenever
known — ``visit``, ``run``, ``analysis``, ``flow_run`` and ``request_id``, taken from
:func:`log_context` (context variables, so concurrent requests never mix their ids) or
from a record's ``extra``.  Hand-rolled on :mod:`logging` rather than a JSON-log package:
it is 60 lines and the light distribution (inside blueapi) may not add a dependency.

Tokens never reach a log line: :func:`redact` replaces anything shaped like a JWT or a
bearer/basic credential, in every format (text too), as a last line of defence behind the
rule that code logs no credential (tests/ops/test_story.py scans a whole story's logs).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import time

__all__ = ['PREFECT_JSON_LOGS', 'ID_FIELDS', 'log_context', 'current_ids', 'redact', 'JsonFormatter', 'RedactingFormatter',
           'configure_logging']

#: Prefect's processes (server, worker, flow runs) log JSON with Prefect's own formatter, which
#: carries ``flow_run_id``/``flow_run_name``/``task_run_id``: set this in their environment.
PREFECT_JSON_LOGS = {"PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER": "json"}

ID_FIELDS = ("visit", "run", "analysis", "flow_run", "request_id")
_ids: contextvars.ContextVar[dict] = contextvars.ContextVar("visitflow_log_ids", default={})

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_AUTH = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def redact(text: str) -> str:
    """``text`` with JWTs and Authorization credentials replaced by ``[redacted]``."""
    return _AUTH.sub(lambda m: f"{m.group(1)} [redacted]", _JWT.sub("[redacted-token]", text))


@contextlib.contextmanager
def log_context(**ids):
    """Within the block, log lines carry these ids (``None`` values are dropped)."""
    token = _ids.set({**_ids.get(), **{k: str(v) for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _ids.reset(token)


def current_ids() -> dict:
    return dict(_ids.get())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": redact(record.getMessage())}
        doc.update(_ids.get())
        for key in ID_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = str(value)
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class RedactingFormatter(logging.Formatter):
    """The plain text format, with :func:`redact` applied."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(fmt: str | None = None, level: str = "info") -> None:
    """Root handler in ``fmt`` (``json``/``text``; default ``$VISITFLOW_LOG_FORMAT`` or text).
    Also re-formats uvicorn's own handlers, if any; services run uvicorn with
    ``log_config=None`` so its error and access lines propagate to this root handler."""
    fmt = (fmt or os.environ.get("VISITFLOW_LOG_FORMAT") or "text").lower()
    formatter = JsonFormatter() if fmt == "json" else RedactingFormatter(
        "%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            handler.setFormatter(formatter)
