"""Automatic recovery of a flow run whose worker died: a Prefect automation on heartbeats.

Why an automation, not the worker's own resubmission: the failure to survive is the worker
host itself (SIGKILL of the worker and its children, a dead machine, a cut cable).  A dead
worker cannot resubmit anything, and no other worker knows what it was running.  The part
that survives any single worker host is the server side: every flow run emits a heartbeat
event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (30, Prefect's minimum; set in
:func:`visitflow.production.ha_topology.prefect_ha_env`), the events reach the services
process through Redis, and its triggers service evaluates a *proactive* trigger: "after a
heartbeat of flow run X, expect another heartbeat (or a final state) within
:data:`WITHIN_SECONDS`".  When that does not happen the action moves the run back to
``Scheduled`` (the same flow run: same id, same idempotency key, same grant), and any live
worker of the pool picks it up.  The live engine then resumes from its checkpoint in Tiled
(``resuming live ... from checkpoint``), so the analysis completes once, in one flow run.

Rescheduling (not ``Crashed`` + a new run through ``run-deployment``) keeps "exactly once"
visible in Prefect: one flow run per analysis of a run, its ``run_count`` says how often it
was started.  The window must be longer than a network blip the system should ride out:
a heartbeat lost in a 30 s cut is re-sent when the link returns (Prefect's events client
keeps unconfirmed events), so 75 s tolerates one missed beat plus slack.

This is Prefect's documented "detect zombie flow runs" pattern with a different action.  A cut
longer than the window leaves the first attempt alive on the cut-off host while the
rescheduled one runs elsewhere: live writes are therefore fenced by attempt in Tiled
(visitflow/tiled/live_fence.py), and the old attempt stops without reporting a state
(visitflow/flow/attempt.py).
"""

from __future__ import annotations

from ..core.prefect_api import PrefectAPI

__all__ = ['AUTOMATION_NAME', 'WITHIN_SECONDS', 'recovery_automation', 'ensure_recovery_automation',
           'deploy_probe', 'PROBE_DEPLOYMENT']

AUTOMATION_NAME = "visitflow: reschedule flow runs whose heartbeats stopped"
WITHIN_SECONDS = 75
#: A do-nothing flow (benchmarks/probe_flows.py) on the pool, for bursts that measure
#: orchestration rather than analysis.
PROBE_DEPLOYMENT = "probe/visitflow-local"

_FINAL = ["prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
          "prefect.flow-run.Crashed", "prefect.flow-run.Cancelling", "prefect.flow-run.Paused",
          "prefect.flow-run.Suspended"]


def recovery_automation(within: float = WITHIN_SECONDS) -> dict:
    """The automation (Prefect's ``/automations/`` body)."""
    return {
        "name": AUTOMATION_NAME,
        "description": "A flow run that stops heartbeating (its worker host died) is moved back to "
                       "Scheduled; another worker resumes it (visitflow/production/ha_recovery.py).",
        "enabled": True,
        "trigger": {
            "type": "event", "posture": "Proactive",
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", *_FINAL],
            "for_each": ["prefect.resource.id"],
            "threshold": 1, "within": within,
        },
        "actions": [{"type": "change-flow-run-state", "state": "SCHEDULED", "name": "Rescheduled",
                     "message": f"no heartbeat for {within:.0f} s: its worker is gone; rescheduled", "force": True}],
    }


def ensure_recovery_automation(api: PrefectAPI, within: float = WITHIN_SECONDS) -> str:
    """Create the automation unless one of that name exists; returns its id."""
    for existing in api.request("POST", "/automations/filter", json={"limit": 200}):
        if existing["name"] == AUTOMATION_NAME:
            return existing["id"]
    return api.request("POST", "/automations/", json=recovery_automation(within))["id"]


def deploy_probe(api: PrefectAPI, pool: str = "visitflow-local") -> str:
    """The probe deployment on ``pool`` (idempotent); returns its id."""
    from ..stack.prefect import REPO

    flow = api.request("POST", "/flows/", json={"name": "probe"})
    return api.request("POST", "/deployments/", json={
        "name": pool, "flow_id": flow["id"], "entrypoint": "probe_flows.py:probe",
        "path": str(REPO / "benchmarks"), "work_pool_name": pool, "enforce_parameter_schema": False,
        "pull_steps": [{"prefect.deployments.steps.set_working_directory":
                        {"directory": str(REPO / "benchmarks")}}]})["id"]
