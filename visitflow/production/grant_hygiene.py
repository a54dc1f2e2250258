"""Grant hygiene: delegation grants are deleted when their runs end or they expire.

A grant (T_grant) waits in a Prefect Secret named for (analysis, visit, run) until the flow
runs that need it have loaded it.  Left there it is a standing credential: useless without
the ``visitflow`` client secret, but worth nothing to keep.  :func:`sweep` removes every
grant Secret that

* has expired (its own ``exp``), or is not a readable visitflow grant at all; or
* whose runs have ended: a ``post`` flow run of its (analysis, visit, run) exists and every
  flow run of the triple is in a final state (a ``live`` run alone may still be followed by
  the post run the trigger creates at the stop document);

but never one issued after the newest flow run of its triple was created, while it is younger
than ``creation_window`` (default 10 min): that is a by-hand re-run (``visitflow trigger``)
whose grant is saved *before* its flow run is created, and whose older, ended runs would
otherwise make it look finished (issue 20 finding 7).  The trigger writes the grant first on
purpose — a flow run created first could be picked up by the worker before its grant exists
— so the sweep, not the trigger, closes the window;

and, given a token service, also *revokes* the grant there (RFC 7009, as client
``visitflow``, which is the grant's audience), so a copy taken before deletion is dead too.

Run it periodically (``visitflow grants-sweep``, e.g. a Prefect deployment on a schedule or a
cron job next to the Prefect server); it is idempotent and needs only the Prefect API.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import jwt

from ..core import names as grants
from ..core.prefect_api import PrefectAPI
from ..core.scopes import RunScope, ScopeSet
from ..core.tokens import unverified_claims

__all__ = ['FINAL', 'CREATION_WINDOW', 'SweepResult', 'grant_secrets', 'sweep', 'revoker', 'add_arguments', 'run']

log = logging.getLogger("visitflow.grants")

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass(frozen=True)
class SweepResult:
    deleted: dict  # secret name -> why
    kept: int


#: how long a grant newer than every flow run of its triple is kept for its flow run to appear
CREATION_WINDOW = 600.0


def _created(run: dict) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(run.get("created")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")   # unreadable: treat as new, i.e. do not let it hide a young grant


def _grant_run(token: str) -> Optional[tuple[str, str, str, float]]:
    """(analysis, visit, run, exp) of a grant, read without verification (we only delete)."""
    try:
        claims = unverified_claims(token)
    except jwt.PyJWTError:
        return None
    scopes = ScopeSet.lenient(claims.get("scope"))
    runs = [(s.analysis, s.visit) for s in scopes if isinstance(s, RunScope)]
    data = [s.run for s in scopes.data_scopes() if s.run]
    if len(runs) != 1 or not data or "exp" not in claims:
        return None
    return runs[0][0], runs[0][1], data[0], float(claims["exp"])


def grant_secrets(api: PrefectAPI, prefix: str = grants.PREFIX) -> list[dict]:
    """Secret block documents whose names carry the grant prefix, with their values."""
    docs = api.request("POST", "/block_documents/filter", json={
        "block_types": {"slug": {"any_": ["secret"]}}, "include_secrets": True, "limit": 200})
    return [d for d in docs if str(d.get("name", "")).startswith(prefix + "-")]


def sweep(api: PrefectAPI, *, prefix: str = grants.PREFIX, revoke: Optional[Callable[[str], None]] = None,
          now: Optional[float] = None, creation_window: float = CREATION_WINDOW) -> SweepResult:
    """Delete (and revoke) the grants described in the module docstring; ``creation_window=0``
    turns the re-run protection off (what the sweep did before issue 20)."""
    now = time.time() if now is None else now
    deleted, kept = {}, 0
    for doc in grant_secrets(api, prefix):
        name, token = doc["name"], str((doc.get("data") or {}).get("value", ""))
        about = _grant_run(token)
        if about is None:
            why = "not a readable visitflow grant"
        else:
            analysis, visit, run, exp = about
            if grants.grant_secret_name(analysis, visit, run, prefix) != name:
                why = "stored under another run's name"
            elif exp <= now:
                why = "expired"
            else:
                runs = api.flow_runs(tags=[f"run:{run}", f"analysis:{analysis}", f"visit:{visit}"])
                states = [(r.get("state") or {}).get("type") for r in runs]
                has_post = any("variant:post" in r.get("tags", []) for r in runs)
                iat = float(unverified_claims(token).get("iat") or 0)
                awaiting_run = iat > max((_created(r) for r in runs), default=0) and now - iat < creation_window
                if has_post and all(s in FINAL for s in states) and not awaiting_run:
                    why = "its runs have ended"
                else:
                    kept += 1
                    continue
        if revoke is not None and token:
            try:
                revoke(token)
            except Exception as exc:  # noqa: BLE001 - deleting still helps; say why revocation failed
                log.warning("could not revoke grant %s: %s", name, exc)
        api.delete_secret(name)
        deleted[name] = why
        log.info("deleted grant %s: %s", name, why)
    return SweepResult(deleted, kept)


def revoker(issuer: str, client_id: str, client_secret: str) -> Callable[[str], None]:
    """Revoke grants at the token service as ``client_id`` (the grant's audience, ``visitflow``)."""
    from ..core import oauth
    from ..core.tokens import discover

    endpoint = discover(issuer)["revocation_endpoint"]
    return lambda token: oauth.revoke(endpoint, token, client_id=client_id, client_secret=client_secret)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefect-api-url", default=os.environ.get("PREFECT_API_URL"), required=False)
    p.add_argument("--issuer", default=None, help="token service to revoke deleted grants at (optional)")
    p.add_argument("--client-id", default="visitflow")
    p.add_argument("--client-secret-env", default="VISITFLOW_CLIENT_SECRET")


def run(args: argparse.Namespace) -> int:
    if not args.prefect_api_url:
        raise SystemExit("--prefect-api-url or $PREFECT_API_URL is needed")
    revoke = revoker(args.issuer, args.client_id, os.environ[args.client_secret_env]) if args.issuer else None
    with PrefectAPI(args.prefect_api_url, os.environ.get("PREFECT_API_AUTH_STRING")) as api:
        result = sweep(api, revoke=revoke)
    for name, why in result.deleted.items():
        print(f"deleted {name}: {why}")
    print(f"{len(result.deleted)} deleted, {result.kept} kept (runs still to come or running)")
    return 0
