"""The token service's Prometheus metrics (``GET /metrics``), with prometheus-client.

* ``visitflow_token_requests_total{client,grant,outcome}`` — every ``/token`` call; outcome
  is ``ok`` or the RFC 6749 error (``access_denied``, ``temporarily_unavailable``, ...).
* ``visitflow_token_request_seconds{grant}`` — latency histogram of the same.
* ``visitflow_authority_*`` — questions to OPA, its latency and cache hits
  (:mod:`visitflow.core.authority_metrics`).
* ``visitflow_token_revocations_total{kind}`` — ``jti`` (a token) or ``sid`` (a session).

The authority's numbers come from :mod:`visitflow.core.signals` (the light code cannot
import this library); the rest is counted where it happens, in :mod:`.server`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from ..core import authority_metrics

__all__ = ['REQUESTS', 'REQUEST_SECONDS', 'REVOCATIONS', 'install', 'exposition']

REQUESTS = Counter("visitflow_token_requests", "Token endpoint calls", ["client", "grant", "outcome"])
REQUEST_SECONDS = Histogram("visitflow_token_request_seconds", "Token endpoint latency", ["grant"],
                            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
REVOCATIONS = Counter("visitflow_token_revocations", "Revocations recorded", ["kind"])


def install() -> None:
    """The authority's series too (:mod:`visitflow.core.authority_metrics`); idempotent."""
    authority_metrics.install()


def exposition() -> tuple[bytes, str]:
    """(body, content type) of ``/metrics``."""
    return generate_latest(), CONTENT_TYPE_LATEST
