"""The authority's (OPA's) metrics, shared by every server that asks it.

The token service and Tiled both ask the authority and both serve ``/metrics``; in one
process (the test suite, a combined deployment) the series may be registered once only,
so they live here and :func:`install` is idempotent.  prometheus-client is imported inside
:func:`install`: :mod:`visitflow.core` is light (no third-party import at module level),
and the trigger never calls this.

* ``visitflow_authority_decision_seconds{kind}`` — each question put to OPA.
* ``visitflow_authority_queries_total{kind,ok}`` — ``ok="false"``: it could not answer (the
  OPA-unavailable alert in deployments/prometheus/rules.yml).
* ``visitflow_authority_cache_total{hit}`` — decision-cache lookups (the hit ratio).
"""

from __future__ import annotations

import threading

from . import signals

__all__ = ['install']

_lock = threading.Lock()
_installed: dict = {}


def install() -> dict:
    """Register the series (once per process) and subscribe them to :mod:`.signals`."""
    with _lock:
        if _installed:
            return _installed
        from prometheus_client import Counter, Histogram

        latency = Histogram("visitflow_authority_decision_seconds", "Latency of a question to the authority",
                            ["kind"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        queries = Counter("visitflow_authority_queries", "Questions to the authority", ["kind", "ok"])
        cache = Counter("visitflow_authority_cache", "Decision-cache lookups", ["hit"])

        def decision(kind: str, seconds: float, ok: bool, **_) -> None:
            latency.labels(kind).observe(seconds)
            queries.labels(kind, str(bool(ok)).lower()).inc()

        def cached(hit: bool, **_) -> None:
            cache.labels(str(bool(hit)).lower()).inc()

        signals.subscribe("authority.decision", decision)
        signals.subscribe("authority.cache", cached)
        _installed.update(latency=latency, queries=queries, cache=cache)
        return _installed
