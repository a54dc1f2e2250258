"""Tiled's visitflow metrics (``GET /metrics`` on the Tiled server, :mod:`.ops_endpoints`).

* ``visitflow_tiled_token_decisions_total{outcome}`` — each token validation the gate
  caches: ``accepted``, ``refused`` (401: bad, expired, revoked) or ``unavailable`` (503: the
  IdP could not confirm it).
* ``visitflow_tiled_token_cache_total{hit}`` — gate lookups answered from the cache.
* ``visitflow_tiled_introspection_seconds`` — RFC 7662 round trips to the token service.
* ``visitflow_authority_*`` — questions to OPA about facility users (as in the token service).

Tiled's own request metrics are not duplicated: these are what visitflow adds.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from ..core import authority_metrics

__all__ = ['DECISIONS', 'CACHE', 'INTROSPECTION_SECONDS', 'install', 'exposition']

DECISIONS = Counter("visitflow_tiled_token_decisions", "Token validations by the gate", ["outcome"])
CACHE = Counter("visitflow_tiled_token_cache", "Gate lookups of a token's cached validation", ["hit"])
INTROSPECTION_SECONDS = Histogram("visitflow_tiled_introspection_seconds", "Introspection latency",
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))


def install() -> None:
    """The authority's series too (:mod:`visitflow.core.authority_metrics`); idempotent."""
    authority_metrics.install()


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
