"""``visitflow trigger``: start an analysis of an existing run by hand, with your own token.

For re-runs (a new version of the analysis, a post run that never happened).  Your token
is exchanged exactly as the trigger inside blueapi would exchange it, so the IdP still
decides whether you may run this analysis on this visit.

``--for <user>``: facility staff recover a user's run (the command a Failed run's message
gives after an IdP outage) with their own facility login and no client secret: the token is
exchanged at the ``visitflow-staff`` client with ``requested_subject`` (the token service's
visitflow/token_service/acting.py decides, with OPA, and names the staff member in ``act``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

__all__ = ['add_arguments', 'run', 'parse_options', 'ui_base', 'report']


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--analysis", required=True, help="e.g. saxs_average")
    p.add_argument("--visit", required=True)
    p.add_argument("--run", required=True, help="run id (start document uid)")
    p.add_argument("--instrument", default=None,
                   help="the run's beamline (start document 'instrument'): needed when the Block's "
                        "raw template has {instrument}")
    p.add_argument("--variant", choices=["post", "live", "both"], default="post")
    p.add_argument("--options", default=None, metavar="JSON",
                   help='the analysis\'s options as a JSON object, e.g. \'{"background": 2.0}\' (or @file.json); '
                        "checked against the analysis's declared options, as a plan's are")
    p.add_argument("--issuer", default=os.environ.get("VISITFLOW_ISSUER", "http://127.0.0.1:8180"))
    p.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    p.add_argument("--for", dest="for_user", default=None, metavar="USER",
                   help="staff recovery: act for this user (as the user office names them) with your own "
                        "facility token; uses the public visitflow-staff client, no secret")
    p.add_argument("--client-id", default=None,
                   help="client that may exchange user tokens (default blueapi; visitflow-staff with --for)")
    p.add_argument("--client-secret-env", default="VISITFLOW_TRIGGER_CLIENT_SECRET",
                   help="environment variable holding that client's secret")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--token-env", help="environment variable holding your access token")
    who.add_argument("--user", help="dev IdP only: log in with this user (password from --password-env)")
    p.add_argument("--password-env", default="VISITFLOW_PASSWORD")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the flow runs to be created")
    p.add_argument("--wait", action="store_true", help="wait for the flow runs to finish; print their final state")
    p.add_argument("--wait-timeout", type=float, default=1800, help="seconds --wait waits for each run")
    p.add_argument("--prefect-ui", default=os.environ.get("PREFECT_UI_URL"),
                   help="Prefect UI base URL for the printed links (default: the API URL without /api)")
    p.add_argument("--grant-scope", choices=["run", "visit"], default=os.environ.get("VISITFLOW_GRANT_SCOPE", "run"),
                   help="'visit' for IdPs that cannot issue per-run scopes (Keycloak); must match the block")


def run(args) -> int:
    from ..core import oauth
    from ..errors import OptionError, ScopeError
    from .callback import AnalysisTrigger, TriggerSettings

    from .outage import STAFF_CLIENT

    client_id = args.client_id or (STAFF_CLIENT if args.for_user else "blueapi")
    secret = os.environ.get(args.client_secret_env, "")
    if not secret and not args.for_user:
        print(f"set {args.client_secret_env} to the {client_id} client secret")
        return 2
    if args.for_user:
        secret = ""       # a public client: the staff member's own token is the credential
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"{args.token_env} is empty")
            return 2
    else:
        password = os.environ.get(args.password_env, args.user)
        token = oauth.password_login(oauth.token_endpoint(args.issuer), args.user, password).access_token
    try:
        options = parse_options(args.options)
    except ValueError as exc:
        print(f"--options: {exc}")
        return 2
    variants = ("live", "post") if args.variant == "both" else (args.variant,)
    with tempfile.TemporaryDirectory() as tmp:
        trigger = AnalysisTrigger(TriggerSettings(issuer=args.issuer, prefect_api_url=args.prefect_api,
                                                  client_id=client_id, client_secret=secret,
                                                  act_for=args.for_user,
                                                  prefect_auth_string=os.environ.get("PREFECT_API_AUTH_STRING"),
                                                  state_dir=Path(tmp), grant_scope=args.grant_scope), token=token)
        try:
            try:
                trigger.request(args.analysis, args.visit, args.run, variants, options=options,
                                instrument=args.instrument)
            except (OptionError, ScopeError) as exc:
                print(f"not requested: {exc}")
                return 2
            trigger.flush(args.timeout)
            requests = trigger.outbox.requests()
        finally:
            trigger.close()
    return report(requests, args)


def parse_options(text: str | None) -> dict:
    """``--options``: a JSON object, inline or ``@path``; ``{}`` when not given."""
    import json

    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object of option values, not {type(value).__name__}")
    return value


def ui_base(args) -> str:
    api = args.prefect_api.rstrip("/")
    return (args.prefect_ui or (api[: -len("/api")] if api.endswith("/api") else api)).rstrip("/")


def report(requests, args) -> int:
    """One line per requested flow run: its name, state and UI link; with --wait, the final
    state.  Exit 0 only if every run was created (and, with --wait, completed)."""
    from ..core.prefect_api import PrefectAPI

    ok = True
    with PrefectAPI(args.prefect_api, os.environ.get("PREFECT_API_AUTH_STRING")) as api:
        for r in requests:
            if r.state != "done":
                print(f"{r.key}: {r.state}" + (f" ({r.error})" if r.error else ""))
                ok = False
                continue
            run = api.wait_for_flow_run(r.flow_run_id, timeout=args.wait_timeout) if args.wait \
                else api.flow_run(r.flow_run_id)
            state = (run.get("state") or {}).get("type", "?")
            print(f"{run.get('name')}: {state}  flow run {r.flow_run_id}  -> {ui_base(args)}/runs/flow-run/{r.flow_run_id}")
            ok &= state == "COMPLETED" if args.wait else True
    return 0 if ok else 1
