"""``AnalysisTrigger``: the bluesky document callback blueapi subscribes next to TiledWriter.

On the *start* document it decides the run's analyses, visit and run id and queues, per
analysis, a delegation grant and a ``live`` flow run; on the *stop* document (success only,
by default) it queues a ``post`` flow run that uses the grant obtained at start, while the
user's token was fresh.  The RunEngine thread only writes a few rows to the local outbox;
a background sender does the network work — RFC 8693 exchange at the IdP, storing the
grant as a Prefect Secret, creating flow runs — retrying with backoff on 5xx/429/connection
errors.  A slow or dead Prefect never slows or breaks the scan.

Refusals are final: if the IdP says the user may not run an analysis for this visit
(``invalid_scope``), that analysis gets no flow run and a clear log line; nothing retries.
An IdP that cannot be *reached* is retried while the user's token lives; after that each
flow run the trigger would have made is recorded in Prefect as a Failed run with the reason
and the way to recover (:mod:`visitflow.trigger.outage`).

Kept light: httpx, pyjwt, sqlite3 (and pydantic/jsonschema for plan options) — no Prefect, no
Tiled server stack (it runs in blueapi).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from ..core import names as grants, oauth
from ..core.options import canonical, check_plan_values, schema_problem
from ..errors import OptionError, PrefectRefused, PrefectUnavailable, ScopeError
from ..core.prefect_api import PrefectAPI
from ..core.scopes import GRANT_SCOPE_MODES, check_name, grant_scopes
from ..core import signals
from . import outage
from .outbox import Outbox
from .. import errors

__all__ = ['TriggerSettings', 'AnalysisTrigger', 'subscribe_for']

log = logging.getLogger("visitflow.trigger")

TokenSource = Callable[[], str]


@dataclass
class TriggerSettings:
    issuer: str
    prefect_api_url: str
    client_id: str = "blueapi"
    client_secret: str = ""
    prefect_auth_string: str | None = None
    state_dir: Path = Path(".visitflow/trigger")
    plan_analyses: dict = field(default_factory=dict)   # plan name -> [analysis, ...]
    live: bool = True
    post_on: tuple = ("success",)                       # stop exit_status values that start post
    grant_prefix: str = grants.PREFIX
    max_backoff: float = 60.0
    #: how long to retry an unreachable IdP for a user token whose life cannot be read (not a
    #: JWT); a JWT's own ``exp`` bounds the retries otherwise (visitflow/trigger/outage.py)
    exchange_window: float = 900.0
    #: "run" (the design) or "visit" (IdPs with a fixed scope list, e.g. Keycloak): see
    #: scopes.GRANT_SCOPE_MODES.  Must match the ScopedCredentials block's grant_scope.
    grant_scope: str = field(default_factory=lambda: os.environ.get("VISITFLOW_GRANT_SCOPE", "run"))
    #: serve the trigger's ``/metrics`` on this loopback port (visitflow.trigger.metrics); None: off
    metrics_port: int | None = None
    #: staff recovery (``visitflow trigger --for <user>``): the token is a staff member's own,
    #: exchanged for a grant acting for this user (visitflow/token_service/acting.py)
    act_for: str | None = None


def _instrument_of(start: dict) -> str | None:
    """The beamline the run came from: the start document's ``instrument`` (blueapi copies its
    ``env.metadata.instrument`` into every run's start document)."""
    value = start.get("instrument")
    return str(value) if value else None


def _visit_of(start: dict) -> str | None:
    for key in ("instrument_session", "visit", "data_session"):
        if start.get(key):
            return str(start[key])
    return None


class AnalysisTrigger:
    """Subscribe to a RunEngine: ``RE.subscribe(AnalysisTrigger(settings, token=...))``.

    ``token`` is the caller's bearer token (blueapi has it from the request's
    ``Authorization`` header) or a callable returning a current one.  One trigger can serve
    many callers: a document may bring its own (``trigger(name, doc, token=...)``).

    A user token is held in memory only until its run's grants are obtained (or their
    exchange finally failed): then it is dropped.

    ``transport`` carries the sender's calls to the IdP and Prefect (``None``: the network)
    and ``sleep`` waits out Prefect's backoff: not settings, but what unit tests inject
    (an ``httpx.MockTransport``, a no-op) to run the send path without servers.
    """

    def __init__(self, settings: TriggerSettings, token: str | TokenSource, *, start_sender: bool = True,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        if settings.grant_scope not in GRANT_SCOPE_MODES:
            raise ValueError(f"grant_scope must be one of {GRANT_SCOPE_MODES}, not {settings.grant_scope!r}")
        self.settings = settings
        self._token: TokenSource = (lambda: token) if isinstance(token, str) else token
        self.outbox = Outbox(Path(settings.state_dir) / "outbox.sqlite")
        self._user_tokens: dict[str, str] = {}     # run -> T_user, in memory only
        self._tokens_lock = threading.Lock()        # a run's token and its grant rows appear together
        self._runs: dict[str, dict] = {}            # run uid -> {visit, analyses}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._token_url: str | None = None
        self._transport = transport
        self._sleep = sleep
        self.decisions: list[str] = []              # what was decided, for logs and tests
        self.metrics = None
        if settings.metrics_port is not None:
            from .metrics import serve_metrics

            self.metrics = serve_metrics(self.outbox, int(settings.metrics_port))
        if start_sender:
            self.start()

    # ---------------------------------------------------------------- bluesky callback
    def __call__(self, name: str, doc: dict, token: str | None = None) -> None:
        try:
            if name == "start":
                self._on_start(doc, token)
            elif name == "stop":
                self._on_stop(doc)
        except Exception:  # noqa: BLE001 - never raise into the RunEngine
            log.exception("visitflow trigger: ignoring error on %s document", name)

    def _decide(self, message: str, *args) -> None:
        text = message % args if args else message
        self.decisions.append(text)
        log.info("visitflow trigger: %s", text)

    def analyses_for(self, start: dict) -> list[str]:
        names = start.get("analyses")
        if names is None:
            names = self.settings.plan_analyses.get(start.get("plan_name", ""), [])
        if isinstance(names, str):
            names = [names]
        out = []
        for n in names:
            try:
                out.append(check_name(str(n), "analysis name"))
            except ScopeError as exc:
                self._decide("skipping analysis %r: %s", n, exc)
        return list(dict.fromkeys(out))

    def options_for(self, start: dict, analyses: list[str]) -> dict[str, dict]:
        """The plan's option values per analysis (``analysis_options`` in the start
        document, from ``uses_analyses(..., options=...)``); an analysis whose values are
        malformed is dropped here, with the reason, before anything is queued."""
        given = start.get("analysis_options") or {}
        out = {}
        for analysis in list(analyses):
            try:
                out[analysis] = check_plan_values(analysis, given.get(analysis) or {}) if isinstance(given, dict) \
                    else check_plan_values(analysis, given)
            except OptionError as exc:
                self._decide("REFUSED %s for run %s: %s — no flow run", analysis, start.get("uid"), exc)
                analyses.remove(analysis)
        return out

    def _on_start(self, doc: dict, token: str | None = None) -> None:
        uid = doc["uid"]
        analyses = self.analyses_for(doc)
        if not analyses:
            return
        visit = _visit_of(doc)
        if visit is None:
            self._decide("run %s declares analyses %s but has no instrument_session/visit: not triggering",
                         uid, analyses)
            return
        instrument = _instrument_of(doc)
        try:
            check_name(visit, "visit")
            if instrument is not None:
                check_name(instrument, "instrument")
        except ScopeError as exc:
            self._decide("run %s: %s: not triggering", uid, exc)
            return
        try:
            token = token or self._token()
        except Exception as exc:  # noqa: BLE001
            self._decide("run %s: no user token (%s): not triggering", uid, exc)
            return
        options = self.options_for(doc, analyses)
        if not analyses:
            return
        self._runs[uid] = {"visit": visit, "analyses": analyses, "options": options}
        with self._tokens_lock:
            self._user_tokens[uid] = token
            for analysis in analyses:
                self.outbox.add_grant(analysis, visit, uid, canonical(options[analysis]) if options[analysis] else None,
                                      instrument)
        for analysis in analyses:
            if self.settings.live:
                self.outbox.add_request(grants.idempotency_key(analysis, "live", visit, uid, options[analysis]),
                                        analysis, "live", visit, uid)
        self._decide("run %s visit %s: queued %s for %s", uid, visit,
                     "live+post" if self.settings.live else "post", ", ".join(analyses))
        self._wake.set()

    def _on_stop(self, doc: dict) -> None:
        uid = doc.get("run_start")
        run = self._runs.pop(uid, None)
        if run is None:
            return
        status = doc.get("exit_status")
        if status not in self.settings.post_on:
            self._decide("run %s ended %s: no post analysis", uid, status)
            return
        for analysis in run["analyses"]:
            key = grants.idempotency_key(analysis, "post", run["visit"], uid, run.get("options", {}).get(analysis))
            self.outbox.add_request(key, analysis, "post", run["visit"], uid)
        self._wake.set()

    def request(self, analysis: str, visit: str, run: str, variants=("post",), options: dict | None = None,
                instrument: str | None = None) -> list[str]:
        """Queue an analysis by hand (``visitflow trigger``), with this trigger's token.

        Each call is a new flow run per variant: its idempotency key is the trigger's plus a
        fresh re-run id (the trigger's own key would hand back the run it made).  Returns
        the keys."""
        check_name(analysis, "analysis name")
        check_name(visit, "visit")
        check_name(run, "run id")
        if instrument is not None:
            check_name(instrument, "instrument")
        options = check_plan_values(analysis, options or {})
        token = self._token()
        with self._tokens_lock:
            self._user_tokens[run] = token
            self.outbox.reset_grant(analysis, visit, run, canonical(options) if options else None, instrument)
        keys = [grants.rerun_key(analysis, variant, visit, run, options) for variant in variants]
        for key, variant in zip(keys, variants):
            self.outbox.add_request(key, analysis, variant, visit, run)
        self._decide("requested %s %s for %s/%s", analysis, "+".join(variants), visit, run)
        self._wake.set()
        return keys

    # ---------------------------------------------------------------- sender
    def start(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._stop.clear()
            self._sender = threading.Thread(target=self._run_sender, name="visitflow-trigger-sender", daemon=True)
            self._sender.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(timeout)
        if self.metrics is not None:
            self.metrics.server.shutdown()
            self.metrics.close()
        self.outbox.close()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is pending (True), or ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.pending_count() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.outbox.pending_count() == 0

    def _backoff(self, attempts: int) -> float:
        return min(self.settings.max_backoff, 0.5 * 2 ** attempts)

    def prefect_api(self, attempts: int = 2) -> PrefectAPI:
        """The Prefect client the sender uses (close it after use); pass it to :meth:`send_once`."""
        return PrefectAPI(self.settings.prefect_api_url, self.settings.prefect_auth_string, attempts=attempts,
                          transport=self._transport, sleep=self._sleep)

    def _run_sender(self) -> None:
        api = self.prefect_api()
        try:
            while not self._stop.is_set():
                try:
                    self.send_once(api)
                except Exception:  # noqa: BLE001 - keep the sender alive whatever happens
                    log.exception("visitflow trigger: sender error")
                nxt = self.outbox.next_due()
                wait = 5.0 if nxt is None else max(0.0, min(5.0, nxt - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            api.close()

    def send_once(self, api: PrefectAPI) -> None:
        for g in self.outbox.due_grants("exchange"):
            if g.options and not self._options_fit(api, g):
                continue
            self._exchange(g)
            self._forget_token_when_done(g.run)
        for g in self.outbox.due_grants("store"):
            try:
                api.save_secret(grants.grant_secret_name(g.analysis, g.visit, g.run, self.settings.grant_prefix),
                                g.token)
                self.outbox.set_grant(g, state="ready")
            except (PrefectUnavailable, PrefectRefused) as exc:
                self.outbox.set_grant(g, state="store", error=str(exc), retry_in=self._backoff(g.attempts))
        for r in self.outbox.due_requests():
            self._create(api, r)
        for r in self.outbox.due_requests("report"):
            self._record_failure(api, r)

    def _options_fit(self, api: PrefectAPI, g) -> bool:
        """Check the plan's option values against the deployment's parameter schema before
        the grant exchange, so a bad option never reaches the IdP or a flow run.  If Prefect
        cannot be asked now, go on: Prefect enforces the same schema when the run is created."""
        try:
            schema = api.deployment_parameter_schema(grants.deployment_name(g.analysis, "post"))
        except (PrefectUnavailable, PrefectRefused) as exc:
            log.info("visitflow trigger: options of %s not checked before the exchange (%s)", g.analysis, exc)
            return True
        problem = schema_problem(schema, g.option_values, g.analysis)
        if problem is None:
            return True
        self._decide("REFUSED %s for visit %s run %s: %s — no flow run", g.analysis, g.visit, g.run, problem)
        signals.emit("trigger.refused", reason="options")
        self.outbox.set_grant(g, state="refused", error=problem)
        self._fail_requests(g, "refused", problem)
        return False

    def _exchange(self, g) -> None:
        user_token = self._user_tokens.get(g.run)
        if user_token is None:
            self._give_up(g, outage.lost_token_reason(analysis=g.analysis, visit=g.visit, run=g.run,
                                                      options=g.option_values))
            return
        expires_at = outage.token_expiry(user_token) or (g.created or time.time()) + self.settings.exchange_window
        if g.attempts and expires_at <= time.time():
            self._give_up(g, self._unreachable(g, expires_at))   # died while the IdP was away
            return
        started = time.monotonic()
        try:
            if self._token_url is None:
                self._token_url = oauth.token_endpoint(self.settings.issuer, transport=self._transport)
            resp = oauth.exchange(self._token_url, user_token, client_id=self.settings.client_id,
                                  client_secret=self.settings.client_secret, audience="visitflow",
                                  scope=str(grant_scopes(g.analysis, g.visit, g.run, self.settings.grant_scope)),
                                  # Keycloak lets visitflow refresh its data tokens only if this
                                  # exchange opened a blueapi client session (docs/production.md)
                                  requested_token_type=oauth.REFRESH_TOKEN_TYPE, transport=self._transport,
                                  requested_subject=self.settings.act_for)
        except errors.OAuthRefused as exc:
            signals.emit("trigger.exchange", seconds=time.monotonic() - started, outcome=exc.error or "refused")
            if g.attempts and outage.died_during_outage(exc.error, expires_at):  # refused as expired, after it
                self._give_up(g, self._unreachable(g, expires_at))
                return
            signals.emit("trigger.refused", reason=exc.error or "refused")
            self._decide("REFUSED %s for visit %s run %s: the IdP says %s — no flow run", g.analysis, g.visit,
                         g.run, exc)
            self.outbox.set_grant(g, state="refused", error=str(exc))
            self._fail_requests(g, "refused", str(exc))
            return
        except (errors.OAuthUnavailable, httpx.HTTPError, ValueError, OSError) as exc:  # discovery too: retried
            signals.emit("trigger.exchange", seconds=time.monotonic() - started, outcome="unavailable")
            delay = outage.retry_in(self._backoff(g.attempts), expires_at)
            if delay is None:   # the user's token dies before the next try could reach the IdP
                g.attempts, g.error = g.attempts + 1, str(exc)
                self._give_up(g, self._unreachable(g, expires_at))
            else:
                self.outbox.set_grant(g, state="exchange", error=str(exc), retry_in=delay)
            return
        signals.emit("trigger.exchange", seconds=time.monotonic() - started, outcome="ok")
        self.outbox.set_grant(g, state="store", token=resp.access_token)
        self._decide("delegated %s on %s/%s", g.analysis, g.visit, g.run)

    def _unreachable(self, g, expires_at: float) -> str:
        return outage.unreachable_reason(
            user=outage.user_of(self._user_tokens.get(g.run)), issuer=self.settings.issuer, since=g.created or time.time(), attempts=g.attempts,
            last_error=g.error or "", expires_at=expires_at, analysis=g.analysis, visit=g.visit, run=g.run,
            options=g.option_values, secrets=(self.settings.client_secret, self.settings.prefect_auth_string or ""))

    def _give_up(self, g, reason: str) -> None:
        """No grant will come: each of its flow runs is to be recorded in Prefect as Failed."""
        self._decide("FAILED %s for visit %s run %s: %s (recorded in Prefect as Failed flow runs)", g.analysis,
                     g.visit, g.run, reason)
        signals.emit("trigger.refused", reason="gave_up")
        self.outbox.set_grant(g, state="failed", error=reason)
        self._fail_requests(g, "report", reason)

    def _forget_token_when_done(self, run: str) -> None:
        """Drop the run's user token once no grant of that run still needs exchanging."""
        with self._tokens_lock:
            if run in self._user_tokens and not self.outbox.exchanges_pending(run):
                del self._user_tokens[run]

    def holds_token_for(self, run: str) -> bool:
        return run in self._user_tokens

    def _fail_requests(self, g, state: str, error: str) -> None:
        for r in self.outbox.requests_for(g.analysis, g.visit, g.run, state="pending"):
            self.outbox.set_request(r.key, state=state, error=error)

    def _create(self, api: PrefectAPI, r) -> None:
        g = self.outbox.grant(r.analysis, r.visit, r.run)
        if g is not None and g.state == "failed":   # e.g. a post request queued after the exchange gave up
            self.outbox.set_request(r.key, state="report", error=g.error)   # recorded in this same pass
            return
        if g is None or g.state == "refused":
            self.outbox.set_request(r.key, state=g.state if g else "failed", error="no delegation grant")
            return
        if g.state != "ready":
            return  # wait for the grant to be stored; the sender comes back
        try:
            run = api.create_analysis_run(r.analysis, r.variant, r.visit, r.run, g.option_values, idempotency_key=r.key,
                                          instrument=g.instrument)
        except PrefectUnavailable as exc:
            self.outbox.set_request(r.key, state="pending", error=str(exc), retry_in=self._backoff(r.attempts))
            return
        except PrefectRefused as exc:
            final = exc.status in (400, 404, 409, 422)  # 409: Prefect's own parameter-schema check
            if final:
                signals.emit("trigger.refused", reason=f"prefect_{exc.status}")
            self._decide("Prefect refused %s: %s%s", r.key, exc, "" if final else " (will retry)")
            self.outbox.set_request(r.key, state="failed" if final else "pending", error=str(exc),
                                    retry_in=None if final else self._backoff(r.attempts))
            return
        self.outbox.set_request(r.key, state="done", flow_run_id=run["id"])
        self._decide("created %s flow run %s (%s)", r.key, run["id"], run.get("name"))

    def _record_failure(self, api: PrefectAPI, r) -> None:
        """Create ``r``'s flow run directly in a Failed state carrying the reason (its own
        idempotency key: once, however often this is retried); Prefect down: retried."""
        g = self.outbox.grant(r.analysis, r.visit, r.run)
        try:
            run = api.create_analysis_run(r.analysis, r.variant, r.visit, r.run, g.option_values if g else {},
                                          idempotency_key=r.key, state=outage.failed_state(r.error or "no grant"),
                                          instrument=g.instrument if g else None)
        except PrefectUnavailable as exc:
            self.outbox.set_request(r.key, state="report", error=r.error, retry_in=self._backoff(r.attempts))
            log.info("visitflow trigger: recording the failure of %s waits for Prefect (%s)", r.key, exc)
            return
        except PrefectRefused as exc:
            final = exc.status in (400, 404, 409, 422)
            self._decide("Prefect refused to record the failure of %s: %s%s", r.key, exc, "" if final else " (will retry)")
            self.outbox.set_request(r.key, state="failed" if final else "report", error=r.error,
                                    retry_in=None if final else self._backoff(r.attempts))
            return
        self.outbox.set_request(r.key, state="failed", flow_run_id=run["id"], error=r.error)
        self._decide("recorded %s as Failed flow run %s (%s)", r.key, run["id"], run.get("name"))


def subscribe_for(settings: TriggerSettings, token: str | TokenSource, run_engine) -> AnalysisTrigger:
    """Convenience for blueapi's ``begin_task``: build and subscribe a trigger; returns it."""
    trigger = AnalysisTrigger(settings, token)
    run_engine.subscribe(trigger)
    return trigger

