"""The trigger's Prometheus metrics, served from inside blueapi on ``metrics_port``.

* ``visitflow_trigger_outbox_depth{item}`` — what waits in the outbox now (``request:pending``,
  ``grant:exchange``, ...), read from the outbox at scrape time (a custom collector, the
  prometheus-client way for a value another store owns).
* ``visitflow_trigger_outbox_oldest_seconds`` — age of the oldest waiting item (0: none):
  the "outbox stuck" alert (deployments/prometheus/rules.yml).
* ``visitflow_trigger_refusals_total{reason}`` — no flow run: the IdP's RFC 6749 error
  (``access_denied``, ``invalid_scope`` ...), ``options``, ``prefect_<status>``, ``gave_up``.
* ``visitflow_trigger_exchange_seconds{outcome}`` — RFC 8693 exchanges at the token service.

The trigger is in the light distribution (no third-party package beyond blueapi's own may
be imported at module level: tests/test_code_shape.py), so prometheus-client is imported
only when a port is configured (``metrics_port`` / ``VISITFLOW_TRIGGER_METRICS_PORT``);
``pip install visitflow-trigger[metrics]`` brings it.  The counts arrive as
:mod:`visitflow.core.signals`.
"""

from __future__ import annotations

import time

from ..core import signals

__all__ = ['TriggerMetrics', 'serve_metrics']


class TriggerMetrics:
    """The trigger's metrics in their own registry, served by prometheus-client's HTTP server."""

    def __init__(self, outbox):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.outbox = outbox
        self.registry = CollectorRegistry()
        self.refusals = Counter("visitflow_trigger_refusals", "Analyses refused (no flow run)", ["reason"],
                                registry=self.registry)
        self.exchange = Histogram("visitflow_trigger_exchange_seconds", "Grant exchanges at the token service",
                                  ["outcome"], registry=self.registry,
                                  buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        metrics = self

        class OutboxCollector:
            def collect(self):
                depth = GaugeMetricFamily("visitflow_trigger_outbox_depth", "Outbox items waiting", labels=["item"])
                for item in ("request:pending", "request:report", "grant:exchange", "grant:store"):
                    depth.add_metric([item], 0.0)
                for item, n in metrics.outbox.depth().items():
                    depth.add_metric([item], float(n))
                oldest = metrics.outbox.oldest_pending_created()
                age = GaugeMetricFamily("visitflow_trigger_outbox_oldest_seconds",
                                        "Age of the oldest waiting outbox item (0: none)",
                                        value=max(0.0, time.time() - oldest) if oldest else 0.0)
                yield depth
                yield age

        self.registry.register(OutboxCollector())
        signals.subscribe("trigger.refused", self._refused)
        signals.subscribe("trigger.exchange", self._exchanged)

    def _refused(self, reason: str, **_) -> None:
        self.refusals.labels(reason).inc()

    def _exchanged(self, seconds: float, outcome: str, **_) -> None:
        self.exchange.labels(outcome).observe(seconds)

    def close(self) -> None:
        signals.unsubscribe("trigger.refused", self._refused)
        signals.unsubscribe("trigger.exchange", self._exchanged)


def serve_metrics(outbox, port: int, host: str = "127.0.0.1") -> TriggerMetrics:
    """Start ``/metrics`` on ``host:port`` (a daemon thread); returns the metrics."""
    from prometheus_client import start_http_server

    metrics = TriggerMetrics(outbox)
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    metrics.server = server
    return metrics
