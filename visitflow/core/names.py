"""Where a run's delegation grant is kept: one deterministic Prefect Secret per
(analysis, visit, run).

Both sides compute the name — the trigger (inside blueapi) when it stores T_grant, the
flow when it loads it — so the name is the only thing that travels, and the flow run's
parameters stay exactly ``{visit, run_id}``.  Secrets never go into parameters or job
variables: Prefect stores and shows those in clear.

Prefect block-document names allow lowercase letters, digits and dashes; visits, runs and
analysis names allow more (``_``, ``.``, upper case), so the readable part is slugged and a
hash of the exact triple keeps distinct triples from colliding.
"""

from __future__ import annotations

import hashlib
import re

from ..errors import UsageError
from .scopes import check_name

__all__ = [ 'PREFIX', 'grant_secret_name', 'flow_name', 'deployment_name', 'idempotency_key',
    'rerun_key', 'run_tags', 'instrument_from_tags', 'INSTRUMENT_TAG', 'flow_run_name',
]

PREFIX = "vf-grant"


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


def grant_secret_name(analysis: str, visit: str, run_id: str, prefix: str = PREFIX) -> str:
    """``vf-grant-saxs-average-a1-0f9c1e4a-<hash10>`` for (saxs_average, a1, 0f9c1e4a-…)."""
    for value, what in ((analysis, "analysis name"), (visit, "visit"), (run_id, "run id")):
        check_name(value, what)
    digest = hashlib.sha256(f"{analysis}\0{visit}\0{run_id}".encode()).hexdigest()[:10]
    return f"{prefix}-{_slug(analysis, 24)}-{_slug(visit, 16)}-{_slug(run_id, 8)}-{digest}"


def flow_name(analysis: str) -> str:
    """Prefect flow name of an analysis: ``saxs_average`` → ``saxs-average``."""
    return analysis.replace("_", "-")


def deployment_name(analysis: str, variant: str) -> str:
    """``saxs-average/live`` — what the trigger asks Prefect to run."""
    if variant not in ("live", "post"):
        raise UsageError(f"variant must be 'live' or 'post', not {variant!r}")
    return f"{flow_name(analysis)}/{variant}"


def idempotency_key(analysis: str, variant: str, visit: str, run_id: str, options: dict | None = None) -> str:
    """One flow run per (analysis, variant, visit, run, options), however often the trigger
    retries; options (:mod:`visitflow.core.options`) add a short hash of their values, so other
    values are another run."""
    from .options import digest

    suffix = digest(options)
    return f"{analysis}/{variant}/{visit}/{run_id}" + (f"/opt-{suffix}" if suffix else "")


def rerun_key(analysis: str, variant: str, visit: str, run_id: str, options: dict | None = None,
              rerun_id: str | None = None) -> str:
    """A by-hand re-run's key: the trigger's key plus a re-run id (fresh by default), so each
    ``visitflow trigger`` is a new flow run while the trigger's own runs stay one per key."""
    import uuid

    return f"{idempotency_key(analysis, variant, visit, run_id, options)}/rerun-{rerun_id or uuid.uuid4().hex[:12]}"


INSTRUMENT_TAG = "instrument:"


def run_tags(analysis: str, visit: str, run_id: str, variant: str, instrument: str | None = None) -> list[str]:
    tags = [f"visit:{visit}", f"run:{run_id}", f"analysis:{analysis}", f"variant:{variant}", "visitflow"]
    return tags + ([INSTRUMENT_TAG + instrument] if instrument else [])


def instrument_from_tags(tags) -> str | None:
    """The run's beamline from its flow run's tags (:func:`run_tags`), or None."""
    found = [t[len(INSTRUMENT_TAG):] for t in tags or () if isinstance(t, str) and t.startswith(INSTRUMENT_TAG)]
    return found[0] if len(found) == 1 and found[0] else None


def flow_run_name(analysis: str, variant: str, visit: str, run_id: str) -> str:
    return f"{flow_name(analysis)}/{variant} {visit} {run_id[:8]}"
