"""``visitflow demo``: the seed's story, end to end, on this machine.

1. Start (or reuse) the stack.
2. Alice logs in (dev password grant) and runs a real bluesky plan — a motor scan with a
   scalar and a 2-D detector, simulated — with ``TiledWriter`` and ``AnalysisTrigger``
   subscribed, exactly as blueapi would.  The plan declares its analyses with
   ``@uses_analyses("saxs_average", "peak_stats")``.
3. The trigger delegates (RFC 8693) and starts a live and a post flow run per analysis;
   the demo waits for them and prints the processed results Alice reads with her token.
4. Refusals: Carol (a member of the visit without the right to run analyses) gets no flow
   run; Bob (another visit) cannot read Alice's data nor delegate an analysis on it.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from ..core import oauth
from .cli import add_port_arguments, config_from_args
from . import prefect as pstack
from .local import DEV_SECRETS, LocalStack, StackConfig, say
from .. import errors

__all__ = ['run_user_scan', 'main', 'add_arguments', 'run']


def _plan(num: int, delay: float, md: dict):
    from .sim import motor_scan
    from ..trigger.plans import uses_analyses

    @uses_analyses("saxs_average", "peak_stats")
    def demo_scan(dets, motor):
        return (yield from motor_scan(dets, motor, num, delay=delay, md={"plan_name": "demo_scan", **md}))

    return demo_scan


def run_user_scan(config: StackConfig, user: str, visit: str, num: int, delay: float, shape=(64, 64),
                  on_event=None):
    """A scan as ``user`` with TiledWriter + AnalysisTrigger; returns (uid, trigger)."""
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from .sim import make_devices
    from ..core.tiled_client import BearerAuth, connect
    from ..trigger import AnalysisTrigger, TriggerSettings

    token_url = oauth.token_endpoint(config.issuer)
    login = oauth.password_login(token_url, user, user)
    root = connect(config.tiled_uri, BearerAuth(lambda: (login.access_token, login.expires_at)))
    trigger = AnalysisTrigger(TriggerSettings(
        issuer=config.issuer, prefect_api_url=config.prefect_api, client_id="blueapi",
        client_secret=DEV_SECRETS["blueapi"], state_dir=config.state_dir.resolve() / "trigger",
        prefect_auth_string=pstack.auth_string(config.state_dir.resolve())),
        token=login.access_token)
    motor, det, saxs = make_devices(shape)
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(TiledWriter(root["raw"][visit], batch_size=1))   # what blueapi already does
    RE.subscribe(trigger)                                          # what visitflow adds
    if on_event:
        RE.subscribe(on_event)
    (uid,) = RE(_plan(num, delay, {"instrument_session": visit})([det, saxs], motor))
    return uid, trigger, root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="visitflow demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="stack state directory (default .visitflow)")
    p.add_argument("--frames", type=int, default=40, help="scan points (default 40)")
    p.add_argument("--delay", type=float, default=0.25, help="seconds between points (default 0.25)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the analyses")
    p.add_argument("--no-ui", action="store_true", help="start the Prefect server without its UI")
    add_port_arguments(p)   # the same ports as `visitflow up` (defaults 8180, 8000, 4200, 8182)


def run(args) -> int:
    from ..core.prefect_api import PrefectAPI
    from ..flow.sink import read_result

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("visitflow.trigger").setLevel(logging.INFO)
    config = config_from_args(args)
    stack = LocalStack(config)
    stack.up()

    say(f"alice: scanning {args.frames} points in visit a1 (TiledWriter + AnalysisTrigger subscribed)...")
    t0 = time.monotonic()
    seen = {"n": 0}

    def progress(name, doc):
        if name == "event":
            seen["n"] += 1
            if seen["n"] % 10 == 0 or seen["n"] == args.frames:
                print(f"  scan: {seen['n']}/{args.frames} points", flush=True)

    uid, trigger, alice_root = run_user_scan(config, "alice", "a1", args.frames, args.delay, on_event=progress)
    say(f"alice: scan {uid} finished in {time.monotonic() - t0:.1f}s; waiting for the trigger to hand over...")
    if not trigger.flush(timeout=60):
        say("trigger: requests still pending (is Prefect up?) — they stay in the outbox and are retried")
    runs = [r for r in trigger.outbox.requests() if r.run == uid]
    trigger.close()
    ok = True
    with PrefectAPI(config.prefect_api, stack.prefect_auth) as api:
        for r in runs:
            if r.state != "done":
                say(f"{r.key}: {r.state} {r.error or ''}")
                ok = False
                continue
            fr = api.wait_for_flow_run(r.flow_run_id, timeout=args.timeout)
            state = fr["state"]["type"]
            ok &= state == "COMPLETED"
            say(f"{fr['name']}: {state}  -> {config.prefect_ui}/runs/flow-run/{fr['id']}")
    for analysis in ("saxs_average", "peak_stats"):
        node = alice_root[f"processed/a1/{uid}/{analysis}"]
        result = read_result(node)
        summary = ", ".join(f"{k}={np.asarray(v).shape if np.ndim(v) else round(float(v), 4)}"
                            for k, v in sorted(result.items()))
        say(f"result {analysis} ({node.metadata.get('current')}): {summary}")

    # Refusals
    say("carol (member of a1, without run:* scopes) scans: her data is written, no analysis may start...")
    uid_c, trig_c, _ = run_user_scan(config, "carol", "a1", 3, 0.0, shape=(8, 8))
    trig_c.flush(timeout=30)
    for line in trig_c.decisions:
        if "REFUSED" in line:
            say(f"  {line}")
    trig_c.close()
    bob = oauth.password_login(oauth.token_endpoint(config.issuer), "bob", "bob")
    from ..core.tiled_client import BearerAuth, connect

    bob_root = connect(config.tiled_uri, BearerAuth(lambda: (bob.access_token, bob.expires_at)))
    say(f"bob (visit a2) lists raw/: {sorted(bob_root['raw'])} — a1 is not even visible")
    try:
        oauth.exchange(oauth.token_endpoint(config.issuer), bob.access_token, client_id="blueapi",
                       client_secret=DEV_SECRETS["blueapi"], audience="visitflow",
                       scope=f"run:saxs_average:a1 read:raw:a1/{uid} write:processed:a1/{uid}")
        say("bob: UNEXPECTEDLY allowed to delegate on a1")
        ok = False
    except errors.OAuthRefused as exc:
        say(f"bob asks to analyse alice's run: refused by the IdP ({exc.error}: {exc.description})")

    say("open:")
    say(f"  Prefect UI  {config.prefect_ui}/runs   (flow runs, logs, artifacts: result images)")
    say(f"              its login asks for the auth string: cat {stack.state / pstack.AUTH_FILE}")
    say(f"  Tiled       {config.tiled_uri}/api/v1/metadata/processed/a1/{uid}  (Bearer token needed)")
    say("  stop everything: visitflow down")
    return 0 if ok else 1
