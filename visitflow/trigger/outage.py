"""When the trigger cannot get a run's delegation grant in time: how long it keeps trying,
and how the failure is made visible to staff.

**Retry while the user's token lives.**  The grant can only be obtained with the user's own
token (RFC 8693 exchange at the token service), and that token is short-lived.  While the
token service is unreachable (connection errors, 5xx, 429) the trigger retries with bounded
exponential backoff (``TriggerSettings.max_backoff``), its last try just before the token's
``exp``.  The ``exp`` is read from the token without verifying it: it only tells the trigger
when to stop asking; the token service verifies the token.  A token that is not a JWT has no
readable life: the trigger then tries for ``TriggerSettings.exchange_window`` seconds.

**Then record a failure staff can see in Prefect.**  Each analysis flow run the trigger would
have made becomes a flow run of the same deployment created directly in a ``Failed`` state
(no worker ever picks it up), with the trigger's own idempotency key — a replayed document, a
restarted blueapi or a retried send yields that one flow run, never a second — and a state
message that says why and how to recover once the token service is back: the command facility
staff run with their own login, acting for the user (``visitflow trigger … --for <user>``: the
grant names the staff member in ``act``, visitflow/token_service/acting.py), or the one the user
runs with a fresh token of their own.  Neither needs the trigger's ``blueapi`` secret.  Why a flow run and not only a Prefect event: it is where
staff already look (the deployment's runs, the run's tags ``visit:``/``run:``), it sits next
to the runs that did happen, its state change is itself Prefect's ``prefect.flow-run.Failed``
event (so an existing "notify on failure" automation covers it without a new event name), and
the idempotency key makes "recorded exactly once" Prefect's job.  The message never holds a
token or a secret (:func:`scrub`).

Refusals stay what they were: a token service that *decides* the user may not run the
analysis (``invalid_scope``, ``access_denied``) creates no flow run at all — the design's
"no → no flow run".  Only "could not ask in time" is recorded this way.

Light: pyjwt and the standard library (it runs inside blueapi).
"""

from __future__ import annotations

import json
import re
import shlex
import time

import jwt

from ..core.tokens import unverified_claims

__all__ = [
    'LAST_TRY_MARGIN', 'CLOCK_SKEW', 'STAFF_CLIENT', 'user_of', 'staff_command', 'token_expiry', 'retry_in', 'died_during_outage', 'scrub', 'recovery_command',
    'unreachable_reason', 'lost_token_reason', 'failed_state',
]

#: seconds before the token's ``exp`` of the last exchange attempt
LAST_TRY_MARGIN = 1.0
#: a refusal this close to (or after) the token's ``exp``, after failed attempts, is read as
#: "the token died during the outage" (the token service's clock may run ahead of ours)
CLOCK_SKEW = 30.0
#: the token service's client for staff recovery (deployments/token-service.yaml)
STAFF_CLIENT = "visitflow-staff"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_ERROR = 300


def token_expiry(token: str) -> float | None:
    """The token's ``exp`` (Unix time), unverified; ``None`` if it is not a JWT with one."""
    try:
        exp = unverified_claims(token).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


def retry_in(backoff: float, expires_at: float, now: float | None = None) -> float | None:
    """Seconds until the next exchange attempt (at most ``backoff``, the last one just before
    ``expires_at``), or ``None``: the token will be dead by then, give up."""
    left = expires_at - (time.time() if now is None else now)
    if left <= LAST_TRY_MARGIN:
        return None
    return max(0.0, min(backoff, left - LAST_TRY_MARGIN))


def died_during_outage(oauth_error: str, expires_at: float, now: float | None = None) -> bool:
    """Whether a refusal that ends an outage (the trigger had failed to reach the token
    service before) means "the user's token expired meanwhile": the token service calls the
    subject token invalid and the token is within :data:`CLOCK_SKEW` of its ``exp`` (the
    token service's clock may run ahead of ours).  A decision (``invalid_scope``,
    ``access_denied``) stays a refusal."""
    left = expires_at - (time.time() if now is None else now)
    return oauth_error in ("invalid_token", "invalid_grant") and left < CLOCK_SKEW


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without anything token-shaped and without the given secret values; short."""
    text = _JWT.sub("<token>", text or "")
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<secret>")
    return text if len(text) <= _MAX_ERROR else text[:_MAX_ERROR] + "…"


def user_of(token: str | None) -> str | None:
    """The user as the authority names them (OPA's rule: ``fedid``, else ``preferred_username``,
    else ``sub``), read unverified from the user's token: only to write the staff command."""
    try:
        claims = unverified_claims(token) if token else {}
    except jwt.PyJWTError:
        return None
    name = claims.get("fedid") or claims.get("preferred_username") or claims.get("sub")
    return name if isinstance(name, str) and name else None


def _trigger_argv(analysis: str, visit: str, run: str, options: dict | None) -> list[str]:
    cmd = ["visitflow", "trigger", "--analysis", analysis, "--visit", visit, "--run", run, "--variant", "post"]
    if options:
        cmd += ["--options", json.dumps(options, sort_keys=True, separators=(",", ":"))]
    return cmd


def recovery_command(analysis: str, visit: str, run: str, options: dict | None = None) -> str:
    """What the user runs, with their own token, once the token service answers again."""
    return " ".join(shlex.quote(c) for c in _trigger_argv(analysis, visit, run, options)) + " --token-env <VAR> --wait"


def staff_command(analysis: str, visit: str, run: str, user: str | None, options: dict | None = None) -> str:
    """What facility staff run with their own facility login, acting for ``user``."""
    cmd = " ".join(shlex.quote(c) for c in [*_trigger_argv(analysis, visit, run, options), "--for"])
    return f"{cmd} {shlex.quote(user) if user else '<USER>'} --token-env <VAR> --wait"


def _way_back(analysis: str, visit: str, run: str, options: dict | None, user: str | None) -> str:
    return (f"facility staff run, with their own login: {staff_command(analysis, visit, run, user, options)} ; "
            f"or the user runs: {recovery_command(analysis, visit, run, options)}")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def unreachable_reason(*, user: str | None = None, issuer: str, since: float, attempts: int, last_error: str, expires_at: float,
                       analysis: str, visit: str, run: str, options: dict | None = None,
                       secrets: tuple[str, ...] = ()) -> str:
    """The failed run's message: no grant, because the token service could not be reached
    before the user's token expired; and the way back."""
    return (f"Not started: no delegation grant. The token service {issuer} could not be reached "
            f"from {_utc(since)} ({attempts} attempt{'s' if attempts != 1 else ''}, last: "
            f"{scrub(last_error, secrets)}) until the user's token expired at {_utc(expires_at)}; "
            f"nothing was analysed. To recover, once the token service answers, "
            f"{_way_back(analysis, visit, run, options, user)}")


def lost_token_reason(*, analysis: str, visit: str, run: str, options: dict | None = None) -> str:
    return ("Not started: no delegation grant. The trigger restarted before it could exchange the user's "
            "token (it is kept in memory only, never on disk); nothing was analysed. To recover, "
            f"{_way_back(analysis, visit, run, options, None)}")


def failed_state(message: str) -> dict:
    """The state a recorded failure is created in (Prefect's StateCreate)."""
    return {"type": "FAILED", "name": "Failed", "message": message}
