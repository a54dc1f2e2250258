"""``python -m benchmarks.blueapi_latency``: start document → flow body running, through the
real blueapi 1.21.1 server vs the in-process trigger, in the same run on the same servers.

Both sides run the same plan (``peak_scan`` from deployments/blueapi/visitflow_example_plans.py)
as Alice, write the run into the same Tiled (blueapi's layout) and trigger ``peak_stats``
through the same Prefect server, warm worker and token service (tests/fixtures/blueapi_stack.py):

* **blueapi**: ``POST /tasks`` + ``PUT /worker/task``; blueapi's TiledWriter and the trigger
  inside blueapi's worker process (hook: visitflow.trigger.blueapi_hook);
* **in-process**: a RunEngine in this process with bluesky-tiled-plugins' TiledWriter and an
  ``AnalysisTrigger`` subscribed (as tests/trigger/test_trigger.py does).

Latency = the live flow run's ``start_time`` (Prefect: entered Running, i.e. the flow body
starts) minus the start document's ``time``; one task at a time, each waited for, the two
sides alternating (so a busy machine slows both alike); the first of each side is a warm-up
and dropped.  Appends a section to benchmarks/RESULTS.md.

Where the time goes, per trial (``timeline``): the grant's Secret block created (exchange +
store), the live flow run created (Scheduled), picked up by the worker (Pending), its job
configuration resolved and labelled (Submitting), Running: Prefect's own state history.

Prefect on PostgreSQL by default (``--prefect-db auto``: a throwaway cluster, as ``python -m
benchmarks`` runs P1; production runs Prefect on PostgreSQL, docs/production.md).  On SQLite
(``--prefect-db sqlite``) 2-3 of 11 trials per side took ~2.3 s longer, always between Pending
and Submitting: the server answers the worker's request there with 503 (SQLite's write lock
held by the other flow run's writes, "database is locked") and Prefect's client waits
``2**1`` s ± jitter before its retry (benchmarks/results/blueapi_tail.md has the timelines).

``--service-account``: the blueapi side runs in ``tiled.authentication: ServiceAccount`` mode
(a second blueapi on the same stack, tests/fixtures/blueapi_stack.py ``service_account_blueapi``):
the raw run is written by the beamline's service account, the trigger still acts with Alice's
token from the request's pass-through headers.  Its own section in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deployments" / "blueapi"))

from tests.fixtures import blueapi_stack as bs  # noqa: E402
from visitflow.core.prefect_api import PrefectAPI  # noqa: E402

SECTION = "## blueapi: start document → flow body running (benchmarks/blueapi_latency.py)"
SECTION_SA = ("## blueapi in service-account Tiled mode: start document → flow body running "
              "(benchmarks/blueapi_latency.py --service-account)")


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_runs(api: PrefectAPI, uid: str, n: int = 2, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = api.flow_runs(tags=[f"run:{uid}"])
        if len(runs) >= n:
            return [api.wait_for_flow_run(r["id"], timeout=timeout, interval=0.2) for r in runs]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(runs)} flow runs for {uid} after {timeout}s")
        time.sleep(0.2)


#: The steps of a trial's timeline, each from the previous one (``timeline``): what the gap holds.
STEPS = (("grant", "start doc → grant stored (trigger: exchange at the IdP + Secret block)"),
         ("created", "grant stored → live flow run created (Scheduled)"),
         ("picked_up", "created → worker proposed Pending (its poll)"),
         ("submitting", "Pending → Submitting (worker: job configuration resolved, labels written)"),
         ("running", "Submitting → Running (fork of the warm child, its Running proposal)"))


def gaps(start_doc_time: float, secret_created: float | None, states: list[tuple[str, float]]) -> dict:
    """A trial's timeline as the gaps of :data:`STEPS` (seconds; None where a timestamp is
    missing): ``states`` are the live flow run's (name, epoch seconds) from Prefect's state
    history, in any order; the first of each name counts."""
    first: dict[str, float] = {}
    for name, when in sorted(states, key=lambda s: s[1]):
        first.setdefault(name, when)
    points = [start_doc_time, secret_created, first.get("Scheduled"), first.get("Pending"),
              first.get("Submitting"), first.get("Running")]
    out = {}
    for (step, _), a, b in zip(STEPS, points, points[1:]):
        out[step] = None if a is None or b is None else round(b - a, 3)
    out["total"] = None if points[-1] is None else round(points[-1] - start_doc_time, 3)
    return out


def timeline(api: PrefectAPI, root, uid: str) -> dict:
    """Run ``uid``'s live analysis, from Prefect's records: :func:`gaps` of its timeline."""
    from visitflow.core import names

    runs = wait_runs(api, uid)
    live = next(r for r in runs if "variant:live" in r["tags"])
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    start_doc = root[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}/{uid}"].metadata["start"]
    secret = api.request("GET", "/block_types/slug/secret/block_documents/name/"
                         + names.grant_secret_name("peak_stats", bs.SESSION, uid), ok404=True)
    states = api.request("GET", "/flow_run_states/", params={"flow_run_id": live["id"]})
    out = gaps(float(start_doc["time"]), ts(secret["created"]) if secret else None,
               [(s["name"], ts(s["timestamp"])) for s in states])
    # the measure itself stays the flow run's start_time (the server's Running), as before
    out["total"] = round(ts(live["start_time"]) - float(start_doc["time"]), 3)
    return out


def latency(api: PrefectAPI, root, uid: str) -> float:
    return timeline(api, root, uid)["total"]


class AliceToken:
    """Alice's token, renewed before the dev IdP's 300 s lifetime runs out."""

    def __init__(self, stack):
        self.stack, self.token, self.at = stack, None, 0.0

    def __call__(self) -> str:
        if self.token is None or time.monotonic() - self.at > 120:
            self.token, self.at = self.stack.token("alice"), time.monotonic()
        return self.token


def one_blueapi_task(server, api, root, token, i: int) -> dict:
    task = server.run(token(), "peak_scan", {"num": 5, "seed": i})
    assert task["errors"] == [], task
    return timeline(api, root, task["outcome"]["result"])


def one_in_process_run(trig, session, api, root, token, i: int) -> dict:
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from visitflow_example_plans import peak_scan

    RE = RunEngine({}, context_managers=[], call_returns_result=True)
    RE.subscribe(TiledWriter(session, batch_size=1))
    RE.subscribe(lambda name, doc: trig(name, doc, token=token()))
    uid = RE(peak_scan(num=5, seed=1000 + i), instrument_session=bs.SESSION, instrument=bs.INSTRUMENT).plan_result
    return timeline(api, root, uid)


def measure(stack, api, root, token, n: int, tmp: Path, server=None,
            timelines: dict | None = None) -> tuple[list[float], list[float]]:
    """(through blueapi, in-process) latencies of ``n`` trials each after one warm-up, the two
    sides alternating; ``timelines`` (if given) gets each measured trial's :func:`timeline`
    under ``"blueapi"`` and ``"in_process"``."""
    from visitflow.core.tiled_client import BearerAuth, connect
    from visitflow.trigger import AnalysisTrigger, TriggerSettings

    trig = AnalysisTrigger(TriggerSettings(issuer=stack.idp.issuer, client_secret="blueapi-dev-secret",
                                           prefect_api_url=f"http://127.0.0.1:{stack.proxy.port}/api",
                                           state_dir=tmp / "in-process-trigger", max_backoff=2.0), token=token)
    session = connect(stack.tiled.uri, BearerAuth(token))[f"{bs.INSTRUMENT}/{bs.PROPOSAL}/{bs.SESSION}"]
    blue, local = [], []
    if timelines is not None:
        timelines.setdefault("blueapi", [])
        timelines.setdefault("in_process", [])
    try:
        for i in range(n + 1):
            b = one_blueapi_task(server or stack.blueapi, api, root, token, i)
            p = one_in_process_run(trig, session, api, root, token, i)
            print(f"[bench] {i}: through blueapi {b['total']:.2f}s {_steps(b)}; "
                  f"in-process {p['total']:.2f}s {_steps(p)}", flush=True)
            if i:   # the first of each is a warm-up
                blue.append(b["total"])
                local.append(p["total"])
                if timelines is not None:
                    timelines["blueapi"].append(b)
                    timelines["in_process"].append(p)
    finally:
        trig.close()
    return blue, local


def _steps(t: dict) -> str:
    return "(" + " ".join(f"{k} {t[k]:.2f}" if t.get(k) is not None else f"{k} ?" for k, _ in STEPS) + ")"


def tail(timelines: list[dict], over: float = 1.0) -> tuple[int, dict[str, int]]:
    """(how many trials took more than ``over`` s beyond the median, and in which step of
    :data:`STEPS` each of those spent its largest excess over that step's median)."""
    totals = [t["total"] for t in timelines]
    if not totals:
        return 0, {}
    median_total = float(np.median(totals))
    step_median = {k: float(np.median([t[k] for t in timelines if t.get(k) is not None] or [0.0]))
                   for k, _ in STEPS}
    where: dict[str, int] = {}
    slow = [t for t in timelines if t["total"] > median_total + over]
    for t in slow:
        step = max((k for k, _ in STEPS if t.get(k) is not None), key=lambda k: t[k] - step_median[k])
        where[step] = where.get(step, 0) + 1
    return len(slow), where


def _tail_text(timelines: list[dict]) -> str:
    count, where = tail(timelines)
    if not count:
        return "no trial > 1 s over p50"
    return f"{count} > 1 s over p50 (in: " + ", ".join(f"{k} ×{v}" for k, v in sorted(where.items())) + ")"


P9_NAME = "P9 start doc → flow body running, through blueapi 1.21.1"
INSTALL_HINT = ("blueapi's own venv is missing (./.venv-blueapi): run `bash .ci/install-blueapi` "
                "(a few minutes), then `python -m benchmarks --only P9`")


def p9_missing_row() -> tuple[str, str, str, str]:
    """P9's row when ./.venv-blueapi is not there: how to get it, not a silent skip."""
    return (P9_NAME, "NOT RUN", INSTALL_HINT, "")


def p9_cells(n: int, blue: list[float], local: list[float], db: str,
             timelines: dict | None = None) -> tuple[str, str, str, str]:
    """P9's row of ``python -m benchmarks``: the in-process trigger (baseline) and blueapi,
    measured alternately on one stack; the last cell counts each side's tail."""
    tl = timelines or {}
    return (f"{P9_NAME} (live, n={n} each, Prefect on {db})",
            f"in-process trigger p50 {pct(local, 50):.2f}s / p95 {pct(local, 95):.2f}s",
            f"blueapi p50 {pct(blue, 50):.2f}s / p95 {pct(blue, 95):.2f}s",
            f"blueapi/in-process p50 {pct(blue, 50) / pct(local, 50):.2f}×; tail: blueapi "
            f"{_tail_text(tl.get('blueapi', []))}, in-process {_tail_text(tl.get('in_process', []))}")


def run(n: int, tmp: Path, database_url: str | None, service_account: bool = False) -> tuple[list, list, dict]:
    """Start the blueapi stack (Prefect on ``database_url``, SQLite if None), measure, stop:
    (blueapi latencies, in-process latencies, timelines)."""
    import contextlib

    from visitflow.core.tiled_client import BearerAuth, connect

    timelines: dict = {}
    tmp.mkdir(parents=True, exist_ok=True)   # P9 passes a directory of its run's, not made yet
    with bs.running_stack(tmp, database_url=database_url) as stack:
        with (stack.service_account_blueapi(tmp / "blueapi-sa") if service_account
              else contextlib.nullcontext(None)) as server:
            api = PrefectAPI(stack.prefect_api, timeout=30)
            token = AliceToken(stack)
            root = connect(stack.tiled.uri, BearerAuth(token))
            try:
                blue, local = measure(stack, api, root, token, n, tmp, server, timelines)
            finally:
                api.close()
    return blue, local, timelines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10, help="measured tasks per side (plus one warm-up)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--service-account", action="store_true",
                   help="blueapi writes to Tiled as the beamline's service account (tiled.authentication)")
    p.add_argument("--prefect-db", choices=["auto", "sqlite"], default="auto",
                   help="auto: Prefect on a throwaway PostgreSQL when the server is installed (as "
                        "`python -m benchmarks`); sqlite: the dev default, with its 503-and-retry tail")
    p.add_argument("--json", help="also write every trial's timeline here")
    args = p.parse_args(argv)
    if not bs.venv_present():
        print(INSTALL_HINT)
        return 2
    import contextlib
    import json

    with contextlib.ExitStack() as stack:
        url = None
        if args.prefect_db == "auto":
            from benchmarks.postgres import throwaway_prefect_database

            url = stack.enter_context(throwaway_prefect_database(print))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        load0 = os.getloadavg()
        blue, local, timelines = run(args.n, tmp, url, args.service_account)
        load1 = os.getloadavg()
    db = url.split(":", 1)[0] if url else "sqlite"
    if args.json:
        Path(args.json).write_text(json.dumps({"db": db, "load": [load0, load1], "blueapi": blue,
                                               "in_process": local, "timelines": timelines}, indent=1))
    section = SECTION_SA if args.service_account else SECTION
    mode = "service-account Tiled mode" if args.service_account else "pass-through Tiled mode"
    row = (f"| start doc → flow body running (live), n={args.n} each | "
           f"blueapi p50 {pct(blue, 50):.2f}s / p95 {pct(blue, 95):.2f}s | "
           f"in-process p50 {pct(local, 50):.2f}s / p95 {pct(local, 95):.2f}s | "
           f"{pct(blue, 50) / pct(local, 50):.2f}× (blueapi / in-process, p50) |")
    print(row)
    print("tail: blueapi " + _tail_text(timelines.get("blueapi", [])) + "; in-process "
          + _tail_text(timelines.get("in_process", [])))
    if not args.no_write:
        import platform

        results = REPO / "benchmarks" / "RESULTS.md"
        text = results.read_text() if results.exists() else ""
        head, _, rest = text.partition("\n" + section)
        tail_ = rest[rest.find("\n## "):] if rest and "\n## " in rest else ""
        text = head.rstrip("\n") + tail_
        loads = "/".join(f"{x:.2f}" for x in load0) + " → " + "/".join(f"{x:.2f}" for x in load1)
        text += (f"\n\n{section}\n\n{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{platform.machine()} · {platform.python_version()}; real blueapi 1.21.1 (`blueapi serve`, own "
                 f"venv, {mode}), dev IdP, Tiled 0.2.20, Prefect server on {db} + warm worker, one task at a "
                 f"time; load average {loads}.\n\n"
                 f"| metric | through blueapi | in-process trigger | ratio |\n|---|---|---|---|\n{row}\n\n"
                 f"raw (s): blueapi {[round(v, 2) for v in blue]}; in-process {[round(v, 2) for v in local]}\n")
        results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
