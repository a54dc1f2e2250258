"""Operational signals: light code says what happened, a service's metrics module counts it.

Why not prometheus-client here: :mod:`visitflow.core` and :mod:`visitflow.trigger` are the
light distribution that runs inside blueapi (tests/test_code_shape.py), where no metrics
library may be assumed.  So the light code only calls :func:`emit`; each service that
serves ``/metrics`` (token service, Tiled, worker, the trigger when prometheus-client is
there) subscribes with :func:`subscribe` in its own ``metrics`` module.  With nobody
subscribed an emit is a dictionary lookup: nothing to configure in a plain run.

Signals (name: fields):

* ``authority.decision``: ``kind`` (``opa``), ``seconds``, ``ok`` (bool: it answered) — one per query
* ``authority.cache``: ``hit`` (bool) — one per cached-decision lookup
* ``trigger.exchange``: ``seconds``, ``outcome`` (``ok`` / the refusal reason)
* ``trigger.refused``: ``reason``
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

__all__ = ['subscribe', 'unsubscribe', 'emit']

log = logging.getLogger(__name__)

_subscribers: dict[str, list[Callable[..., None]]] = {}
_lock = threading.Lock()


def subscribe(name: str, fn: Callable[..., None]) -> None:
    """Call ``fn(**fields)`` on every :func:`emit` of ``name`` (once per ``fn``)."""
    with _lock:
        fns = _subscribers.setdefault(name, [])
        if fn not in fns:
            fns.append(fn)


def unsubscribe(name: str, fn: Callable[..., None]) -> None:
    with _lock:
        if fn in _subscribers.get(name, []):
            _subscribers[name].remove(fn)


def emit(name: str, **fields) -> None:
    """Tell the subscribers of ``name``; a failing subscriber is logged, never raised (a
    metric must not break a token exchange)."""
    for fn in list(_subscribers.get(name, ())):
        try:
            fn(**fields)
        except Exception:  # noqa: BLE001 - observability must not change behaviour
            log.exception("signal %s: subscriber %r failed", name, fn)
