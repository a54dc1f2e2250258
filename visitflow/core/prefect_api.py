"""The few Prefect REST calls visitflow makes from outside a flow: store a grant Secret, create
an analysis flow run.

Why not Prefect's Python client: the trigger lives inside blueapi, where importing Prefect
(seconds, and its settings/logging machinery) is not acceptable, and these are four
endpoints.  Prefect on SQLite answers 503 under concurrent writes (and 429 when it sheds
load), so every call retries with backoff; its own client does the same.
"""

from __future__ import annotations

import base64
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from . import names as grants
from ..errors import PrefectRefused, PrefectUnavailable

__all__ = [ 'RETRY_STATUS', 'PrefectAPI']

log = logging.getLogger("visitflow.prefect_api")
RETRY_STATUS = {429, 502, 503, 504}


@dataclass
class PrefectAPI:
    """``api_url`` is PREFECT_API_URL (``http://host:4200/api``); ``auth_string`` is
    PREFECT_API_AUTH_STRING (``user:password``) when the server requires basic auth."""

    api_url: str
    auth_string: str | None = None
    attempts: int = 6
    backoff: float = 0.25
    #: read timeout.  Long on purpose: Prefect on SQLite can hold its write lock for up to a
    #: minute under load (its own services then log "database is locked"); a request that
    #: waits for the lock is slow, not lost.  Connecting stays quick (5 s) so a server that
    #: is down is noticed at once.  Prefect's own client waits 60 s.
    timeout: float = 30.0
    #: what carries the requests (``None``: httpx's own, i.e. the network).  Unit tests pass an
    #: ``httpx.MockTransport`` so the retry, refusal and outage paths run without a server.
    transport: httpx.BaseTransport | None = field(default=None, repr=False, compare=False)
    #: how the backoff between attempts (and the poll of :meth:`wait_for_flow_run`) waits;
    #: unit tests pass a recorder so a retried call takes no wall-clock time.
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self):
        headers = {}
        if self.auth_string:
            headers["Authorization"] = "Basic " + base64.b64encode(self.auth_string.encode()).decode()
        self._client = httpx.Client(base_url=self.api_url.rstrip("/"), headers=headers,
                                   timeout=httpx.Timeout(self.timeout, connect=min(5.0, self.timeout)),
                                   transport=self.transport)
        self._ids: dict[str, str] = {}

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, *, ok404: bool = False, **kw) -> Any:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                resp = self._client.request(method, path, **kw)
            except httpx.TransportError as exc:
                err = f"{method} {path}: {exc!r}"
            else:
                if resp.status_code in RETRY_STATUS:
                    err = f"{method} {path}: HTTP {resp.status_code}"
                elif resp.status_code == 404 and ok404:
                    return None
                elif resp.status_code >= 400:
                    raise PrefectRefused(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:300]}",
                                         resp.status_code)
                else:
                    return resp.json() if resp.content else None
            if attempt == self.attempts:
                raise PrefectUnavailable(err)
            self.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def health(self) -> bool:
        try:
            return self._client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    # ------------------------------------------------------------------ secrets
    def _secret_ids(self) -> tuple[str, str]:
        if "secret_type" not in self._ids:
            block_type = self.request("GET", "/block_types/slug/secret")
            schemas = self.request("POST", "/block_schemas/filter", json={
                "block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}, "limit": 1})
            if not schemas:
                raise PrefectRefused("the Secret block schema is not registered on this server", 404)
            self._ids["secret_type"], self._ids["secret_schema"] = block_type["id"], schemas[0]["id"]
        return self._ids["secret_type"], self._ids["secret_schema"]

    def save_secret(self, name: str, value: str) -> str:
        """Create or overwrite the Secret block ``name``; returns its id.

        A 409 on create means another writer made it between the look-up and the create: look
        it up again and overwrite it.  Once only: a server that answers 409 and then cannot
        find the name again is refused (:class:`PrefectRefused`), not asked forever."""
        type_id, schema_id = self._secret_ids()
        for attempt in (1, 2):
            existing = self.request("GET", f"/block_types/slug/secret/block_documents/name/{name}", ok404=True)
            if existing:
                self.request("PATCH", f"/block_documents/{existing['id']}",
                             json={"data": {"value": value}, "merge_existing_data": False})
                return existing["id"]
            try:
                doc = self.request("POST", "/block_documents/", json={
                    "name": name, "block_type_id": type_id, "block_schema_id": schema_id, "data": {"value": value}})
            except PrefectRefused as exc:
                if exc.status != 409 or attempt == 2:
                    raise
                continue  # lost a race with another writer: overwrite theirs
            return doc["id"]
        raise AssertionError("unreachable")

    def delete_secret(self, name: str) -> bool:
        existing = self.request("GET", f"/block_types/slug/secret/block_documents/name/{name}", ok404=True)
        if not existing:
            return False
        self.request("DELETE", f"/block_documents/{existing['id']}", ok404=True)
        return True

    # ------------------------------------------------------------------ concurrency
    def ensure_concurrency_limit(self, name: str, limit: int) -> None:
        """Create (or resize) a global concurrency limit, e.g. ``visitflow-live-a1``."""
        try:
            self.request("POST", "/v2/concurrency_limits/", json={"name": name, "limit": limit})
        except PrefectRefused as exc:
            if exc.status != 409:
                raise
            self.request("PATCH", f"/v2/concurrency_limits/{name}", json={"limit": limit})

    def ensure_work_queue(self, pool: str, name: str, limit: int | None = None) -> None:
        """Create (or re-limit) work queue ``name`` of ``pool``; idempotent (409 = it exists)."""
        try:
            self.request("POST", f"/work_pools/{pool}/queues/", json={"name": name, "concurrency_limit": limit})
        except PrefectRefused as exc:
            if exc.status != 409:
                raise
            self.request("PATCH", f"/work_pools/{pool}/queues/{name}", json={"concurrency_limit": limit})

    # ------------------------------------------------------------------ flow runs
    def deployment(self, name: str) -> dict:
        """``name`` is ``<flow>/<deployment>``."""
        key = f"deployment:{name}"
        if key not in self._ids:
            dep = self.request("GET", f"/deployments/name/{name}")
            self._ids[key] = dep["id"]
        return {"id": self._ids[key]}

    def create_flow_run(self, deployment: str, parameters: dict, *, idempotency_key: str,
                        tags: list[str] | None = None, name: str | None = None, state: dict | None = None,
                        job_variables: dict | None = None) -> dict:
        """Create a flow run of ``deployment``; the same idempotency key returns the same run.
        ``state`` (a StateCreate, e.g. ``{"type": "FAILED", "message": …}``) creates it in
        that state instead of Scheduled: how the trigger records a run it could not start."""
        dep_id = self.deployment(deployment)["id"]
        body: dict[str, Any] = {"parameters": parameters, "idempotency_key": idempotency_key,
                                "tags": tags or []}
        if name:
            body["name"] = name
        if state:
            body["state"] = state
        if job_variables:
            body["job_variables"] = job_variables
        return self.request("POST", f"/deployments/{dep_id}/create_flow_run", json=body)

    def deployment_parameter_schema(self, name: str) -> dict:
        """The deployment's parameter schema (Prefect generated it from the flow's signature,
        options included); what the trigger checks plan options against."""
        return self.request("GET", f"/deployments/name/{name}").get("parameter_openapi_schema") or {}

    def create_analysis_run(self, analysis: str, variant: str, visit: str, run_id: str,
                            options: dict | None = None, *, idempotency_key: str | None = None,
                            state: dict | None = None, instrument: str | None = None) -> dict:
        """The one way visitflow starts an analysis: parameters exactly ``{visit, run_id}``
        plus the plan's option values, if any.  The key defaults to the trigger's
        one-run-per-(analysis, variant, visit, run, options) key.  ``instrument`` (the run's
        beamline) goes into a tag, ``instrument:<name>``, where the flow finds it for the raw
        template's ``{instrument}``: a tag, not a parameter, so the deployments' parameter
        schema and the idempotency key stay what they were."""
        return self.create_flow_run(
            grants.deployment_name(analysis, variant),
            {"visit": visit, "run_id": run_id, **(options or {})},
            idempotency_key=idempotency_key or grants.idempotency_key(analysis, variant, visit, run_id, options),
            tags=grants.run_tags(analysis, visit, run_id, variant, instrument),
            name=grants.flow_run_name(analysis, variant, visit, run_id),
            state=state,
        )

    def flow_run(self, flow_run_id: str) -> dict:
        return self.request("GET", f"/flow_runs/{flow_run_id}")

    def flow_runs(self, *, tags: list[str] | None = None, limit: int = 200) -> list[dict]:
        body: dict[str, Any] = {"limit": limit, "sort": "EXPECTED_START_TIME_ASC"}
        if tags:
            body["flow_runs"] = {"tags": {"all_": tags}}
        return self.request("POST", "/flow_runs/filter", json=body)

    def wait_for_flow_run(self, flow_run_id: str, timeout: float = 300, interval: float = 0.5) -> dict:
        """Poll until the flow run reaches a final state; returns the flow run."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            state = run.get("state") or {}
            if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {state.get('type')} after {timeout}s")
            self.sleep(interval)
